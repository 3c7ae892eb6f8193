"""extract_features and find_massive_activations against cached activations and known SmolLM2 facts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from scipy import stats

from actsel.activations import FeatureTable, extract_features, find_massive_activations, resolve_hooks
from actsel.activations.hooks import STATISTICS
from actsel.masks import batch_allowed, masked_attention
from actsel.prompts import PromptBuilder
from actsel.tasks import load_task


@pytest.fixture(scope="module")
def byte_task():
    task = load_task("demo")
    task.answer_prefix = ""  # the byte tokenizer would give every label the same first token
    return task


def _expected(span_values: np.ndarray) -> dict[str, float]:
    """Reference statistics of a (tokens, d) array, from numpy and scipy."""
    magnitude = np.abs(span_values)
    median = np.median(magnitude)
    return {
        "mean": span_values.mean(),
        "variance": stats.moment(span_values, 2, axis=None),
        "skewness": stats.skew(span_values, axis=None),
        "kurtosis": stats.kurtosis(span_values, axis=None, fisher=True),
        "token_variance": span_values.var(1).mean(),
        "token_kurtosis": stats.kurtosis(span_values, axis=1).mean(),
        "max_abs": magnitude.max(),
        "max_over_median": magnitude.max() / median,
        "count_above_100": (magnitude > 100).sum(),
    }


def test_extract_matches_cached_activations(tiny_llama, byte_task):
    """Statistics from the hooks equal scipy on run_with_cache activations of each prompt run alone."""
    examples = byte_task.pool[:5]
    spans = ("example", "input", "label", "last")
    table = extract_features(tiny_llama, byte_task, examples, hooks=("hook_mlp_out", "blocks.0.hook_resid_post"),
                             spans=spans, batch_size=3, progress=False)
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.0.hook_resid_post"]
    assert table.values.shape == (5, len(hooks) * len(spans) * len(STATISTICS))
    assert table.uids == [example.uid for example in examples]
    assert table.metadata["extraction"]["hooks"] == hooks
    builder = PromptBuilder(byte_task, tiny_llama.tokenizer)
    for row, example in enumerate(examples):
        prompt = builder.build([example])
        _, cache = tiny_llama.run_with_cache(torch.from_numpy(prompt.input_ids)[None], names_filter=hooks)
        start, end = prompt.demo_span(0, "example")
        bounds = {"example": (start, end), "input": prompt.demo_span(0, "input"),
                  "label": prompt.demo_span(0, "label"), "last": (end - 1, end)}
        for hook in hooks:
            activations = cache[hook][0].double().numpy()
            for span, (lo, hi) in bounds.items():
                for statistic, value in _expected(activations[lo:hi]).items():
                    got = table.values[row, table.feature_index(mask="causal", hook=hook, span=span, statistic=statistic)]
                    np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-12, err_msg=f"{hook} {span} {statistic}")
            magnitude = np.abs(activations[start:end])
            token, dim = np.unravel_index(magnitude.argmax(), magnitude.shape)
            assert table.column(mask="causal", hook=hook, span="example", statistic="argmax_pos")[row] == token
            assert table.column(mask="causal", hook=hook, span="example", statistic="argmax_dim")[row] == dim


def test_isolated_in_context_equals_alone(tiny_llama, byte_task):
    """Under the isolated mask a candidate sees only itself, in context or alone, so its statistics agree."""
    examples = byte_task.pool[:4]
    kwargs = dict(hooks=("hook_resid_post",), spans=("example", "last"), progress=False, batch_size=4)
    in_context = extract_features(tiny_llama, byte_task, examples, masks=("isolated", "causal"),
                                  context="in_context", n_context=2, **kwargs)
    alone = extract_features(tiny_llama, byte_task, examples, masks=("isolated",), context="alone", **kwargs)
    np.testing.assert_allclose(in_context.select(mask="isolated").values, alone.values, rtol=1e-4, atol=1e-6)
    causal = in_context.select(mask="causal", statistic="variance").values
    assert not np.allclose(causal, alone.select(statistic="variance").values, rtol=1e-3)
    contexts = in_context.metadata["contexts"]
    assert [len(entry["demos"]) for entry in contexts] == [2] * 4
    assert all(entry["uid"] not in entry["demos"] for entry in contexts)


def test_in_context_chunks_equal_one_run(tiny_llama, byte_task):
    """Context draws depend on the seed and uid only, so extracting in chunks gives the same table."""
    kwargs = dict(hooks=("hook_mlp_out",), context="in_context", n_context=3, seed=4, progress=False)
    whole = extract_features(tiny_llama, byte_task, byte_task.pool[:6], **kwargs)
    parts = [extract_features(tiny_llama, byte_task, byte_task.pool[i:i + 3], **kwargs) for i in (0, 3)]
    joined = FeatureTable.concat_rows(parts)
    np.testing.assert_allclose(joined.values, whole.values, rtol=1e-5, atol=1e-7)
    assert joined.metadata["contexts"] == whole.metadata["contexts"]


def test_skip_first_token_drops_it(tiny_llama, byte_task):
    example = byte_task.pool[0]
    kwargs = dict(hooks=("blocks.1.hook_resid_post",), spans=("example",), progress=False)
    skipped = extract_features(tiny_llama, byte_task, [example], skip_first_token=True, **kwargs)
    prompt = PromptBuilder(byte_task, tiny_llama.tokenizer).build([example])
    _, cache = tiny_llama.run_with_cache(torch.from_numpy(prompt.input_ids)[None], names_filter="blocks.1.hook_resid_post")
    start, end = prompt.demo_span(0, "example")
    activations = cache["blocks.1.hook_resid_post"][0, start + 1:end].double().numpy()
    np.testing.assert_allclose(skipped.column(statistic="kurtosis")[0], stats.kurtosis(activations, axis=None), rtol=1e-6)


def test_nonfinite_reported_not_averaged(tiny_llama, byte_task, caplog):
    examples = byte_task.pool[:3]
    poisoned_uid = examples[1].uid
    prompt = PromptBuilder(byte_task, tiny_llama.tokenizer).build([examples[1]])

    def poison(activations, hook):
        # Rows of length len(prompt) hold example 1 in a batch of one.
        if activations.shape[1] == len(prompt) and activations.shape[0] == 1:
            activations[0, 3, 0] = float("inf")
        return activations

    with caplog.at_level(logging.WARNING, logger="actsel.activations.extract"):
        with tiny_llama.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", poison)]):
            table = extract_features(tiny_llama, byte_task, examples, hooks=("hook_mlp_out",), batch_size=1,
                                     progress=False)
    bad = table.select(hook="blocks.1.hook_mlp_out").take([poisoned_uid]).values
    assert np.isnan(bad).all()
    assert np.isfinite(table.select(hook="blocks.0.hook_mlp_out").values).all()
    assert np.isfinite(table.select(hook="blocks.1.hook_mlp_out").take([examples[0].uid]).values).all()
    assert table.metadata["nonfinite"] == [
        {"uid": poisoned_uid, "mask": "causal", "hook": "blocks.1.hook_mlp_out", "layer": 1, "span": "example"}
    ]
    assert poisoned_uid in caplog.text


def test_stops_after_last_needed_layer(tiny_llama, byte_task):
    fired = []
    later = ["blocks.1.hook_resid_pre", "ln_final.hook_normalized"]
    with tiny_llama.hooks(fwd_hooks=[(name, lambda x, hook: fired.append(hook.name)) for name in later]):
        extract_features(tiny_llama, byte_task, byte_task.pool[:2], hooks="hook_mlp_out", layers=[0], progress=False)
        assert fired == []
        extract_features(tiny_llama, byte_task, byte_task.pool[:2], hooks="hook_mlp_out", layers=[1], progress=False)
    assert "blocks.1.hook_resid_pre" in fired
    assert "ln_final.hook_normalized" not in fired  # the last block's hook is the end when only stats are needed


def test_bad_arguments_raise(tiny_llama, byte_task):
    with pytest.raises(ValueError, match="Close matches.*hook_mlp_out"):
        resolve_hooks(tiny_llama, "hook_mlp_outt")
    with pytest.raises(ValueError, match="Close matches.*blocks.1.hook_resid_post"):
        resolve_hooks(tiny_llama, "blocks.1.hook_resid_pots")
    with pytest.raises(ValueError, match="out of range"):
        resolve_hooks(tiny_llama, "hook_mlp_out", layers=[2])
    with pytest.raises(ValueError, match="attention scores"):
        resolve_hooks(tiny_llama, "attn.hook_pattern")
    assert resolve_hooks(tiny_llama, "blocks.{L}.mlp.hook_post") == ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    pool = byte_task.pool[:2]
    with pytest.raises(ValueError, match="Unknown context"):
        extract_features(tiny_llama, byte_task, pool, context="nearby", progress=False)
    with pytest.raises(ValueError, match="Unknown spans"):
        extract_features(tiny_llama, byte_task, pool, spans=("query",), progress=False)
    with pytest.raises(ValueError, match="Unknown mask"):
        extract_features(tiny_llama, byte_task, pool, masks=("blind",), progress=False)


def test_custom_mask_equals_named_mask(tiny_llama, byte_task):
    from actsel.masks.strategies import sink_free_mask

    def my_sink_free(prompt):
        return sink_free_mask(prompt)

    kwargs = dict(hooks=("hook_resid_post",), progress=False)
    custom = extract_features(tiny_llama, byte_task, byte_task.pool[:3], masks=(my_sink_free,), **kwargs)
    named = extract_features(tiny_llama, byte_task, byte_task.pool[:3], masks=("sink_free",), **kwargs)
    assert set(custom.columns["mask"]) == {"my_sink_free"}
    np.testing.assert_allclose(custom.values, named.values, rtol=1e-12)


def test_massive_activations_smollm2(smollm2):
    """SmolLM2 carries a value near 2.2e4 at token 0, dimension 507, in hook_resid_post from layer 11."""
    task = load_task("demo")
    builder = PromptBuilder(task, smollm2.tokenizer)
    prompts = [builder.build([example]) for example in task.pool[:2]]
    frame = find_massive_activations(smollm2, prompts, hook="blocks.{L}.hook_resid_post")
    assert set(frame["prompt"]) == {0, 1}
    at_sink = frame[(frame["position"] == 0) & (frame["dimension"] == 507)]
    for prompt_index in (0, 1):
        layers = set(at_sink[at_sink["prompt"] == prompt_index]["layer"])
        assert set(range(11, 28)) <= layers
        assert not layers & set(range(0, 11))
    values = at_sink[at_sink["layer"].between(11, 27)]["value"].abs()
    assert values.between(1.5e4, 3e4).all()
    assert (frame["value"].abs() > 100).all()
    assert (frame["ratio"] >= 1000).all()
    assert (at_sink["token"] == smollm2.tokenizer.bos_token).all()


def test_compiled_statistics_equal_tensor_statistics_smollm2(smollm2, data_dir, monkeypatch):
    """On real SST-2 prompts, the Numba kernel and the tensor version give the same feature table."""
    from actsel.activations import cpu_kernel

    if not cpu_kernel.available():
        pytest.skip("numba is not installed")
    task = load_task("sst2", data_dir=data_dir)
    examples = task.pool[:6]
    kwargs = dict(hooks=("hook_mlp_out", "hook_resid_post"), layers=[0, 9, 10, 11, 29],
                  spans=("example", "input", "label", "last"), batch_size=4, progress=False)
    compiled = extract_features(smollm2, task, examples, **kwargs)
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    reference = extract_features(smollm2, task, examples, **kwargs)
    assert np.array_equal(np.isnan(compiled.values), np.isnan(reference.values))
    moments = compiled.columns["statistic"].isin(STATISTICS[:8]).to_numpy()
    np.testing.assert_allclose(compiled.values[:, moments], reference.values[:, moments], rtol=1e-9)
    np.testing.assert_array_equal(compiled.values[:, ~moments], reference.values[:, ~moments])
    # The comparison covers values above 100 too: from layer 11 every example's residual stream contains some.
    assert compiled.column(mask="causal", hook="blocks.11.hook_resid_post", span="example",
                           statistic="max_abs").min() > 100
