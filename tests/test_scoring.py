"""Per-query metrics and prompt scoring: cached prefix vs full prompts vs unbatched reference runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsel.prompts import PromptBuilder
from actsel.tasks import load_task
from actsel.tasks.base import Example, Task
from actsel.utility import METRICS, default_metric, score_prompts, score_with_prefix
from actsel.utility.metrics import exact_match, first_line
from actsel.utility.scoring import extend_allowed


@pytest.fixture
def byte_task():
    """The demo task with no answer space, so byte-level label words start with distinct tokens."""
    task = load_task("demo")
    task.answer_prefix = ""
    return task


def reference_scores(model, task, demos, queries, metric):
    """Score each prompt alone (no padding, no cache) from the full logits."""
    builder = PromptBuilder(task, model.tokenizer)
    out = []
    for query in queries:
        prompt = builder.build(demos, query, include_answer=metric == "answer_logprob")
        logits = model(torch.tensor(prompt.input_ids)[None])[0].double()
        if metric == "answer_logprob":
            logprobs = torch.log_softmax(logits, dim=-1)
            picked = [logprobs[pos, token].item() for pos, token in zip(prompt.score_positions, prompt.answer_ids)]
            out.append(np.mean(picked))
            continue
        restricted = logits[prompt.score_positions[0], task.label_token_ids(model.tokenizer)]
        gold = task.labels.index(query.label)
        if metric == "accuracy":
            out.append(float(restricted.argmax().item() == gold))
        else:
            out.append(torch.log_softmax(restricted, dim=-1)[gold].item())
    return np.array(out)


@pytest.mark.parametrize("metric", ["accuracy", "label_logprob", "answer_logprob"])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_padded_batches_match_reference(request, model_name, metric, byte_task):
    model = request.getfixturevalue(model_name)
    demos, queries = byte_task.pool[:3], byte_task.eval[:7]
    expected = reference_scores(model, byte_task, demos, queries, metric)
    full = score_prompts(model, byte_task, [demos] * len(queries), queries, metric, batch_size=3)
    cached = score_with_prefix(model, byte_task, demos, queries, metric, batch_size=4)
    assert len({len(q.fields["text"]) for q in queries}) > 1  # rows really are padded
    np.testing.assert_allclose(full, expected, atol=1e-5)
    np.testing.assert_allclose(cached, expected, atol=1e-5)


@pytest.mark.parametrize("mask", ["isolated", "isolated_sink", "label_blind", "sink_free"])
def test_masked_cached_matches_masked_full(tiny_llama, mask, byte_task):
    demos, queries = byte_task.pool[:3], byte_task.eval[:6]
    full = score_prompts(tiny_llama, byte_task, [demos] * len(queries), queries, "label_logprob", mask=mask)
    cached = score_with_prefix(tiny_llama, byte_task, demos, queries, "label_logprob", mask=mask, batch_size=4)
    causal = score_with_prefix(tiny_llama, byte_task, demos, queries, "label_logprob", batch_size=4)
    np.testing.assert_allclose(cached, full, atol=1e-5)
    assert np.abs(cached - causal).max() > 1e-4  # the mask really changed the scores


def test_query_dependent_mask_falls_back(tiny_llama, byte_task, caplog):
    def odd_length_hides_first_demo(prompt):
        allowed = np.tril(np.ones((len(prompt), len(prompt)), dtype=bool))
        if len(prompt) % 2:
            allowed[:, 1:4] = False  # changes the prefix rows too, so those queries cannot share the cache
        return allowed

    demos, queries = byte_task.pool[:2], byte_task.eval[:6]
    builder = PromptBuilder(byte_task, tiny_llama.tokenizer)
    parities = {len(builder.build(demos, q)) % 2 for q in queries}
    assert parities == {0, 1}
    full = score_prompts(tiny_llama, byte_task, [demos] * len(queries), queries, "label_logprob",
                         mask=odd_length_hides_first_demo)
    with caplog.at_level("WARNING"):
        cached = score_with_prefix(tiny_llama, byte_task, demos, queries, "label_logprob",
                                   mask=odd_length_hides_first_demo)
    np.testing.assert_allclose(cached, full, atol=1e-5)
    assert "do not share the demonstration prefix" in caplog.text


def test_causal_mask_name_matches_no_mask(tiny_llama, byte_task):
    demos, queries = byte_task.pool[:2], byte_task.eval[:4]
    plain = score_with_prefix(tiny_llama, byte_task, demos, queries, "label_logprob")
    named = score_with_prefix(tiny_llama, byte_task, demos, queries, "label_logprob", mask="causal")
    np.testing.assert_array_equal(plain, named)


def test_zero_shot_prefix_is_bos(tiny_llama, byte_task):
    queries = byte_task.eval[:5]
    cached = score_with_prefix(tiny_llama, byte_task, [], queries, "label_logprob")
    expected = reference_scores(tiny_llama, byte_task, [], queries, "label_logprob")
    np.testing.assert_allclose(cached, expected, atol=1e-5)


def test_prefix_runs_once(tiny_llama, byte_task):
    demos, queries = byte_task.pool[:3], byte_task.eval[:8]
    shapes = []

    def record(tensor, hook):
        shapes.append(tuple(tensor.shape[:2]))

    builder = PromptBuilder(byte_task, tiny_llama.tokenizer)
    prefix_length = builder.build(demos, queries[0]).span("query_input")[0]
    with tiny_llama.hooks(fwd_hooks=[("hook_embed", record)]):
        score_with_prefix(tiny_llama, byte_task, demos, queries, "accuracy", batch_size=4)
    assert shapes[0] == (1, prefix_length)
    assert [batch for batch, _ in shapes[1:]] == [4, 4]
    longest_query = max(len(builder.build(demos, q)) for q in queries) - prefix_length
    assert max(width for _, width in shapes[1:]) == longest_query


def test_per_query_demonstrations(tiny_llama, byte_task):
    queries = byte_task.eval[:4]
    demo_lists = [byte_task.pool[i:i + 2] for i in range(4)]
    scores = score_prompts(tiny_llama, byte_task, demo_lists, queries, "label_logprob", batch_size=2)
    for index, (demos, query) in enumerate(zip(demo_lists, queries)):
        expected = reference_scores(tiny_llama, byte_task, demos, [query], "label_logprob")[0]
        assert scores[index] == pytest.approx(expected, abs=1e-5)


def greedy_until_newline(model, prompt_ids, max_tokens=15):
    """Greedy decoding by unbatched full recomputation; return (text, tokens used), text None without a newline."""
    ids = list(prompt_ids)
    new = []
    for _ in range(max_tokens):
        token = int(model(torch.tensor(ids)[None])[0, -1].argmax())
        if token == model.tokenizer.eos_token_id:
            return model.tokenizer.decode(new), len(new)
        ids.append(token)
        new.append(token)
        text = model.tokenizer.decode(new)
        if "\n" in text:
            return text, len(new)
    return None, len(new)


def test_exact_match_on_greedy_answers(tiny_llama):
    demo = load_task("demo")
    texts = [ex.fields["text"] for ex in demo.pool + demo.eval]
    pool = [Example({"text": text}, "x", f"p{i}") for i, text in enumerate(texts[:2])]
    candidates = [Example({"text": text}, "x", f"q{i}") for i, text in enumerate(texts[2:13])]
    task = Task("greedy", "generation", pool, candidates, "Review: {text}\nAnswer:", answer_prefix="")
    builder = PromptBuilder(task, tiny_llama.tokenizer)
    # Queries whose greedy continuation reaches a newline, so their first line is known.
    answers = {}
    for query in candidates:
        text, used = greedy_until_newline(tiny_llama, builder.build(pool, query).input_ids)
        if text is not None and text.strip() and used <= len(first_line(text)) + 4:
            answers[query.uid] = first_line(text)
    assert len(answers) >= 2, "the tiny model should end a few continuations with a newline"
    matched = [q for q in candidates if q.uid in answers][:3]
    queries = [Example(q.fields, answers[q.uid], q.uid) for q in matched]
    queries += [Example(q.fields, answers[q.uid] + "z", q.uid + "z") for q in matched[:1]]
    queries += [Example(candidates[0].fields, "positive", "other")]
    expected = np.array([1.0] * len(matched) + [0.0, 0.0])
    task.eval = queries
    full = score_prompts(tiny_llama, task, [pool] * len(queries), queries, "exact_match", batch_size=3)
    cached = score_with_prefix(tiny_llama, task, pool, queries, "exact_match", batch_size=3)
    np.testing.assert_array_equal(full, expected)
    np.testing.assert_array_equal(cached, expected)


def test_exact_match_rule():
    assert exact_match(" Paris\nThe capital", "Paris") == 1.0
    assert exact_match("Paris is", " Paris") == 0.0
    assert exact_match("\nParis", "Paris") == 0.0


def test_extend_allowed_copies_last_row():
    allowed = np.tril(np.ones((4, 4), dtype=bool))
    allowed[3, 1] = False
    extended = extend_allowed(allowed, 2)
    np.testing.assert_array_equal(extended[:4, :4], allowed)
    np.testing.assert_array_equal(extended[4], [True, False, True, True, True, False])
    np.testing.assert_array_equal(extended[5], [True, False, True, True, True, True])


def test_metric_validation(tiny_llama, byte_task):
    generation = Task("gen", "generation", byte_task.pool, byte_task.eval, "{text}", answer_prefix="")
    assert default_metric(byte_task) == "accuracy"
    assert default_metric(generation) == "answer_logprob"
    assert set(METRICS) == {"accuracy", "label_logprob", "answer_logprob", "exact_match"}
    with pytest.raises(ValueError, match="Unknown metric 'f1'"):
        score_with_prefix(tiny_llama, byte_task, [], byte_task.eval[:2], "f1")
    with pytest.raises(ValueError, match="needs label words"):
        score_with_prefix(tiny_llama, generation, [], generation.eval[:2], "accuracy")
    with pytest.raises(ValueError, match="one demonstration list per query"):
        score_prompts(tiny_llama, byte_task, [[]], byte_task.eval[:2], "accuracy")
    with pytest.raises(ValueError, match="Unknown mask 'nope'"):
        score_with_prefix(tiny_llama, byte_task, [], byte_task.eval[:2], "accuracy", mask="nope")


def check_smollm2_cached(model, data_dir, cases):
    """Score 6 SST-2 queries of different lengths in one padded batch, cached and in full, per (mask, metric)."""
    task = load_task("sst2", data_dir=data_dir).subsample(n_pool=10, n_eval=6, seed=3)
    demos, queries = task.pool[:2], task.eval
    builder = PromptBuilder(task, model.tokenizer)
    assert len({len(builder.build(demos, q)) for q in queries}) > 2  # several lengths in one padded batch
    for mask, metric in cases:
        full = score_prompts(model, task, [demos] * len(queries), queries, metric, mask=mask, batch_size=6)
        cached = score_with_prefix(model, task, demos, queries, metric, mask=mask, batch_size=6)
        np.testing.assert_allclose(cached, full, atol=1e-4, err_msg=f"mask={mask}, metric={metric}")
        if mask is None:
            expected = reference_scores(model, task, demos, queries[:1], metric)
            np.testing.assert_allclose(full[:1], expected, atol=1e-4, err_msg=f"reference, metric={metric}")


def test_smollm2_cached_matches_uncached(smollm2, data_dir):
    check_smollm2_cached(smollm2, data_dir, [(None, "label_logprob"), ("isolated", "answer_logprob")])


@pytest.mark.slow
def test_smollm2_cached_all_cases(smollm2, data_dir):
    cases = [(mask, metric) for mask in (None, "isolated", "label_blind", "sink_free")
             for metric in ("label_logprob", "answer_logprob")]
    check_smollm2_cached(smollm2, data_dir, cases)
