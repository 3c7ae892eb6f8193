"""Prompt builder: segment maps against the text, batches, truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsel.prompts import PromptBuilder, PromptTooLongError, batches_by_length, collate
from actsel.tasks import list_tasks, load_task


@pytest.mark.parametrize("name", list_tasks())
def test_segment_map_matches_text(name, smollm2, data_dir):
    """Every built-in task renders a 4-shot prompt whose segments decode to their own text."""
    tokenizer = smollm2.tokenizer
    task = load_task(name, data_dir=data_dir)
    builder = PromptBuilder(task, tokenizer)
    prompt = builder.build(task.pool[:4], task.eval[0], include_answer=True)

    whole = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert list(prompt.input_ids[1:]) == whole
    assert prompt.segments[0].role == "bos"
    assert prompt.n_demos == 4
    for segment in prompt.segments[1:]:
        assert tokenizer.decode(prompt.input_ids[segment.start:segment.end]) == segment.text
    # Segments tile the prompt in order.
    assert prompt.segments[-1].end == len(prompt)
    for before, after in zip(prompt.segments, prompt.segments[1:]):
        assert before.end == after.start
    # A demonstration has the same tokens alone as inside the prompt.
    for index in range(4):
        alone = builder.build([task.pool[index]])
        start, end = prompt.demo_span(index)
        assert list(alone.input_ids[1:]) == list(prompt.input_ids[start:end])


def test_score_positions_point_at_answer(smollm2):
    task = load_task("demo")
    builder = PromptBuilder(task, smollm2.tokenizer)
    prompt = builder.build(task.pool[:2], task.eval[0], include_answer=True)
    query_start, query_end = prompt.span("query_input")
    answer_start, answer_end = prompt.span("query_answer")
    assert prompt.score_positions[0] == query_end - 1
    assert list(prompt.input_ids[answer_start:answer_end]) == prompt.answer_ids
    assert prompt.score_positions == list(range(query_end - 1, answer_end - 1))
    assert (prompt.roles[answer_start:answer_end] == 5).all()
    assert (prompt.demo_index[:1] == -1).all()
    assert set(np.unique(prompt.demo_index)) == {-1, 0, 1}


def test_collate_mask_ignores_pad_ids(smollm2):
    """SmolLM2's pad id is its EOS id; the mask comes from lengths, so a real EOS stays unmasked."""
    tokenizer = smollm2.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    task = load_task("demo")
    builder = PromptBuilder(task, tokenizer)
    short = builder.build([], task.eval[0])
    long = builder.build(task.pool[:1], task.eval[1])
    short.input_ids = np.concatenate([short.input_ids, [tokenizer.eos_token_id]])
    batch = collate([short, long], tokenizer.pad_token_id)
    assert batch.attention_mask[0, len(short) - 1] == 1
    assert batch.attention_mask[0, len(short):].sum() == 0
    assert batch.attention_mask[1].sum() == len(long)


def test_right_padding_keeps_logits(smollm2):
    task = load_task("demo")
    builder = PromptBuilder(task, smollm2.tokenizer)
    short = builder.build([], task.eval[0])
    long = builder.build(task.pool[:2], task.eval[1])
    batch = collate([short, long], smollm2.tokenizer.pad_token_id)
    with torch.no_grad():
        batched = smollm2(batch.tokens, attention_mask=batch.attention_mask)
        alone = smollm2(torch.from_numpy(short.input_ids)[None])
    torch.testing.assert_close(batched[0, : len(short)], alone[0], rtol=1e-4, atol=1e-3)


def test_too_long_prompt_raises(smollm2):
    task = load_task("demo")
    builder = PromptBuilder(task, smollm2.tokenizer, max_tokens=40)
    with pytest.raises(PromptTooLongError, match="exceeds the context of 40"):
        builder.build(task.pool[:4], task.eval[0])


def test_truncation_drops_leading_demos(smollm2):
    task = load_task("demo")
    full = PromptBuilder(task, smollm2.tokenizer).build(task.pool[:4], task.eval[0])
    limit = len(full) - 5
    builder = PromptBuilder(task, smollm2.tokenizer, max_tokens=limit, truncation="drop_demos")
    prompt = builder.build(task.pool[:4], task.eval[0])
    assert len(prompt) <= limit
    assert prompt.dropped_demos >= 1
    assert prompt.demo_uids == [ex.uid for ex in task.pool[prompt.dropped_demos:4]]
    assert prompt.query_uid == task.eval[0].uid


def test_query_alone_too_long(smollm2):
    task = load_task("demo")
    builder = PromptBuilder(task, smollm2.tokenizer, max_tokens=5, truncation="drop_demos")
    with pytest.raises(PromptTooLongError, match="query alone"):
        builder.build(task.pool[:2], task.eval[0])


def test_byte_tokenizer_prompt(tiny_llama):
    task = load_task("demo")
    tokenizer = tiny_llama.tokenizer
    builder = PromptBuilder(task, tokenizer)
    prompt = builder.build(task.pool[:2], task.eval[0])
    assert tokenizer.decode(prompt.input_ids[1:]) == prompt.text
    for segment in prompt.segments[1:]:
        assert tokenizer.decode(prompt.input_ids[segment.start:segment.end]) == segment.text


@pytest.mark.parametrize("max_padding", [0.0, 0.15, 0.5])
def test_batches_by_length_bound_padding(max_padding):
    rng = np.random.default_rng(0)
    rows = [np.zeros(n) for n in rng.integers(5, 60, size=101)]
    batches = batches_by_length(rows, 8, max_padding=max_padding)
    assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    for batch in batches:
        lengths = [len(rows[i]) for i in batch]
        assert len(batch) <= 8
        assert 1 - sum(lengths) / (max(lengths) * len(lengths)) <= max_padding + 1e-12
    # Without the bound, batches are full and may mix short and long rows.
    loose = batches_by_length(rows, 8)
    assert [len(batch) for batch in loose[:-1]] == [8] * (len(loose) - 1)
    assert len(batches) >= len(loose)
