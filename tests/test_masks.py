"""Attention-mask strategies and the score hook, checked by invariants on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actsel.masks import MASK_STRATEGIES, allowed_matrix, batch_allowed, masked_attention, register_mask
from actsel.prompts import ROLE_DEMO_LABEL, ROLE_QUERY_INPUT, PromptBuilder, collate
from actsel.tasks import load_task


@pytest.fixture(scope="module")
def byte_task():
    task = load_task("demo")
    task.answer_prefix = ""  # the byte tokenizer would give every label the same first token
    return task


@pytest.fixture(scope="module")
def prompt(tiny_llama, byte_task):
    builder = PromptBuilder(byte_task, tiny_llama.tokenizer)
    return builder.build(byte_task.pool[:3], byte_task.eval[0])


def _causal(n):
    return np.tril(np.ones((n, n), dtype=bool))


def _resid(model, tokens, layer=-1, **kwargs):
    layer = model.cfg.n_layers - 1 if layer < 0 else layer
    _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_resid_post", **kwargs)
    return cache[f"blocks.{layer}.hook_resid_post"]


# ---------------------------------------------------------------- strategies


def test_isolated_blocks_see_only_themselves(prompt):
    allowed = allowed_matrix(prompt, "isolated")
    demo = prompt.demo_index
    n = len(prompt)
    for i in range(n):
        for j in range(n):
            if demo[i] >= 0:
                expected = j <= i and demo[j] == demo[i]
            else:
                expected = j <= i
            assert allowed[i, j] == expected, (i, j)
    first_demo_token = prompt.demo_span(0)[0]
    assert not allowed[first_demo_token, 0]
    assert allowed[first_demo_token].sum() == 1


def test_isolated_sink_adds_position_zero(prompt):
    isolated = allowed_matrix(prompt, "isolated")
    with_sink = allowed_matrix(prompt, "isolated_sink")
    in_demo = prompt.demo_index >= 0
    assert with_sink[in_demo, 0].all()
    changed = with_sink != isolated
    assert (changed[:, 1:] == False).all()  # noqa: E712
    assert changed[in_demo, 0].all()


def test_label_blind_hides_labels_from_query(prompt):
    allowed = allowed_matrix(prompt, "label_blind")
    query_rows = prompt.roles == ROLE_QUERY_INPUT
    label_columns = prompt.roles == ROLE_DEMO_LABEL
    assert label_columns.sum() > 0
    assert not allowed[np.ix_(query_rows, label_columns)].any()
    expected = _causal(len(prompt))
    expected[np.ix_(query_rows, label_columns)] = False
    np.testing.assert_array_equal(allowed, expected)


def test_sink_free_blocks_column_zero(prompt):
    allowed = allowed_matrix(prompt, "sink_free")
    assert allowed[0, 0]
    assert not allowed[1:, 0].any()
    np.testing.assert_array_equal(allowed[:, 1:], _causal(len(prompt))[:, 1:])


def test_custom_mask_is_made_causal_with_diagonal(prompt):
    n = len(prompt)
    np.testing.assert_array_equal(allowed_matrix(prompt, lambda p: np.ones((n, n), bool)), _causal(n))
    np.testing.assert_array_equal(allowed_matrix(prompt, lambda p: np.zeros((n, n), int)), np.eye(n, dtype=bool))


def test_bad_masks_raise(prompt):
    with pytest.raises(ValueError, match="Unknown mask 'nope'.*causal"):
        allowed_matrix(prompt, "nope")
    with pytest.raises(ValueError, match="expected"):
        allowed_matrix(prompt, lambda p: np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="0/1"):
        allowed_matrix(prompt, lambda p: np.full((len(p), len(p)), 0.5))
    with pytest.raises(TypeError):
        allowed_matrix(prompt, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_mask("causal")(lambda p: None)
    assert {"causal", "isolated", "isolated_sink", "label_blind", "sink_free"} <= set(MASK_STRATEGIES)


def test_batch_allowed_pads_with_diagonal(tiny_llama, byte_task):
    builder = PromptBuilder(byte_task, tiny_llama.tokenizer)
    short, long = builder.build([byte_task.pool[0]]), builder.build(byte_task.pool[:2], byte_task.eval[0])
    width = len(long) + 2
    allowed = batch_allowed([short, long], "isolated", width).numpy()
    assert allowed.shape == (2, width, width)
    n = len(short)
    np.testing.assert_array_equal(allowed[0, :n, :n], allowed_matrix(short, "isolated"))
    np.testing.assert_array_equal(allowed[0, n:, :], np.eye(width, dtype=bool)[n:])
    np.testing.assert_array_equal(allowed[0, :, n:], np.eye(width, dtype=bool)[:, n:])
    with pytest.raises(ValueError, match="shorter"):
        batch_allowed([long], "causal", len(long) - 1)


# ---------------------------------------------------------------- hook


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_hook_matches_renormalised_pattern(model_name, request, tiny_llama, byte_task):
    """Masking scores equals zeroing the masked pattern entries and renormalising, on a padded batch."""
    model = request.getfixturevalue(model_name)
    builder = PromptBuilder(byte_task, tiny_llama.tokenizer)
    prompts = [builder.build(byte_task.pool[:2], byte_task.eval[0]), builder.build([byte_task.pool[3]], byte_task.eval[1])]
    batch = collate(prompts, pad_id=tiny_llama.tokenizer.pad_token_id)
    rng = np.random.default_rng(0)
    random_mask = lambda p: rng.random((len(p), len(p))) < 0.5  # noqa: E731
    allowed = batch_allowed(prompts, random_mask, batch.tokens.shape[1])

    def renormalise(pattern, hook):
        kept = pattern * allowed[:, None].to(pattern.dtype)
        return kept / kept.sum(-1, keepdim=True).clamp_min(1e-30)

    names = lambda name: name.endswith("hook_pattern")  # noqa: E731
    with model.hooks(fwd_hooks=[(names, renormalise)]):
        reference = _resid(model, batch.tokens, attention_mask=batch.attention_mask)
    with masked_attention(model, allowed):
        masked = _resid(model, batch.tokens, attention_mask=batch.attention_mask)
    plain = _resid(model, batch.tokens, attention_mask=batch.attention_mask)
    for row, length in enumerate(batch.lengths):
        torch.testing.assert_close(masked[row, :length], reference[row, :length], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(masked[row, :length], plain[row, :length], atol=1e-3)


def test_sink_free_equals_deleting_token_zero(tiny_llama, prompt):
    """With rotary positions, blocking key 0 gives positions 1.. the activations of the run without token 0."""
    tokens = torch.from_numpy(prompt.input_ids)[None]
    allowed = batch_allowed([prompt], "sink_free", len(prompt))
    with masked_attention(tiny_llama, allowed):
        masked = _resid(tiny_llama, tokens)
    deleted = _resid(tiny_llama, tokens[:, 1:])
    torch.testing.assert_close(masked[:, 1:], deleted, rtol=1e-5, atol=1e-5)


def test_isolated_demo_equals_demo_alone(tiny_llama, prompt):
    tokens = torch.from_numpy(prompt.input_ids)[None]
    allowed = batch_allowed([prompt], "isolated", len(prompt))
    with masked_attention(tiny_llama, allowed):
        masked = _resid(tiny_llama, tokens)
    for index in range(prompt.n_demos):
        start, end = prompt.demo_span(index, "block")
        alone = _resid(tiny_llama, tokens[:, start:end])
        torch.testing.assert_close(masked[:, start:end], alone, rtol=1e-5, atol=1e-5)


def test_label_blind_layer0_ignores_label_tokens(tiny_llama, prompt):
    """At layer 0 the query reads token embeddings, so changing only label tokens leaves its attention output."""
    tokens = torch.from_numpy(prompt.input_ids)[None]
    changed = tokens.clone()
    labels = torch.from_numpy(prompt.roles == ROLE_DEMO_LABEL)
    changed[0, labels] = (changed[0, labels] + 7) % 200 + 40
    query = torch.from_numpy(prompt.roles == ROLE_QUERY_INPUT)
    name = "blocks.0.hook_attn_out"

    def attn_out(ids):
        _, cache = tiny_llama.run_with_cache(ids, names_filter=name)
        return cache[name][0, query]

    allowed = batch_allowed([prompt], "label_blind", len(prompt))
    with masked_attention(tiny_llama, allowed):
        blind, blind_changed = attn_out(tokens), attn_out(changed)
    torch.testing.assert_close(blind, blind_changed, rtol=0, atol=1e-6)
    assert not torch.allclose(attn_out(tokens), attn_out(changed), atol=1e-4)


def test_kv_cache_prefix_matches_full_run(tiny_llama, prompt):
    """A full-sequence mask applies to a prefix run into a KV cache and to the continuation after it."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    tokens = torch.from_numpy(prompt.input_ids)[None]
    split = prompt.span("query_input")[0]
    allowed = batch_allowed([prompt], "isolated", len(prompt))
    with masked_attention(tiny_llama, allowed):
        full = tiny_llama(tokens)
        cache = TransformerLensKeyValueCache.init_cache(tiny_llama.cfg, tiny_llama.cfg.device, 1)
        prefix = tiny_llama(tokens[:, :split], past_kv_cache=cache)
        rest = tiny_llama(tokens[:, split:], past_kv_cache=cache)
    torch.testing.assert_close(prefix, full[:, :split], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest, full[:, split:], rtol=1e-5, atol=1e-5)
    # The same continuation with only its own rows of the mask, shape (1, q, P + q).
    cache = TransformerLensKeyValueCache.init_cache(tiny_llama.cfg, tiny_llama.cfg.device, 1)
    with masked_attention(tiny_llama, allowed[:, :split, :split]):
        tiny_llama(tokens[:, :split], past_kv_cache=cache)
    with masked_attention(tiny_llama, allowed[:, split:, :]):
        rest_rows = tiny_llama(tokens[:, split:], past_kv_cache=cache)
    torch.testing.assert_close(rest_rows, full[:, split:], rtol=1e-5, atol=1e-5)


def test_hooks_removed_on_error(tiny_llama, prompt):
    allowed = batch_allowed([prompt], "isolated", len(prompt))
    with pytest.raises(RuntimeError, match="boom"):
        with masked_attention(tiny_llama, allowed):
            assert len(tiny_llama.hook_dict["blocks.0.attn.hook_attn_scores"].fwd_hooks) == 1
            raise RuntimeError("boom")
    assert all(len(hook.fwd_hooks) == 0 for hook in tiny_llama.hook_dict.values())


def test_hook_rejects_wrong_shapes(tiny_llama, prompt):
    tokens = torch.from_numpy(prompt.input_ids)[None]
    with pytest.raises(ValueError, match="does not fit"):
        with masked_attention(tiny_llama, torch.ones(1, 3, 5, dtype=torch.bool)):
            tiny_llama(tokens)
    with pytest.raises(ValueError, match="bool tensor"):
        with masked_attention(tiny_llama, torch.ones(1, 3, 3)):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with masked_attention(tiny_llama, torch.ones(1, 3, 3, dtype=torch.bool), layers=[5]):
            pass


def test_isolated_smollm2_demo_equals_demo_alone(smollm2):
    """On SmolLM2 (GQA, rotary), an isolated demonstration block equals its tokens run alone without BOS.

    Rotary attention depends only on relative positions, so the offset of the
    block inside the prompt does not matter.
    """
    task = load_task("demo")
    prompt = PromptBuilder(task, smollm2.tokenizer).build(task.pool[:3], task.eval[0])
    tokens = torch.from_numpy(prompt.input_ids)[None]
    layers = [0, 5, 11, 20, 29]
    names = [f"blocks.{layer}.{hook}" for layer in layers for hook in ("hook_resid_post", "hook_mlp_out")]
    allowed = batch_allowed([prompt], "isolated", len(prompt))
    with masked_attention(smollm2, allowed):
        _, masked = smollm2.run_with_cache(tokens, names_filter=names)
    _, causal = smollm2.run_with_cache(tokens, names_filter=names)
    for index in range(prompt.n_demos):
        start, end = prompt.demo_span(index, "block")
        _, alone = smollm2.run_with_cache(tokens[:, start:end], names_filter=names)
        for name in names:
            # Error relative to the tensor's largest value: float32 rounding on
            # values up to 2.2e4 leaves absolute differences near 1e-3.
            error = (masked[name][:, start:end] - alone[name]).abs().max() / alone[name].abs().max()
            assert error < 1e-4, (name, float(error))
        # Under the causal mask the later demonstrations see earlier ones, so they differ.
        if index > 0:
            assert not torch.allclose(causal[names[-2]][:, start:end], alone[names[-2]], atol=1e-2)
