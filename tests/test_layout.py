"""Weight layout: same outputs bit for bit, and the per-call transposes stop copying."""

from __future__ import annotations

import einops
import pytest
import torch

from actsel.models.layout import use_linear_layout
from actsel.models.tiny import tiny_model


def _contiguous_copy(spec: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two models with equal weights: one as TransformerLens stores them, one re-stored."""
    plain = tiny_model(spec, seed=1, device="cpu", dtype=torch.float32)
    plain.eval()
    relaid = tiny_model(spec, seed=1, device="cpu", dtype=torch.float32)
    relaid.eval()
    assert use_linear_layout(relaid) > 0
    return plain, relaid


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_outputs_are_bitwise_equal(spec):
    plain, relaid = _contiguous_copy(spec)
    tokens = torch.randint(0, plain.cfg.d_vocab, (3, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = plain(tokens, attention_mask=mask)
        actual = relaid(tokens, attention_mask=mask)
    assert torch.equal(expected, actual)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, relaid.state_dict()[name]), name


def test_transposes_no_longer_copy():
    _, model = _contiguous_copy("tiny-llama")
    block = model.blocks[0]
    for weight in (block.mlp.W_gate, block.mlp.W_in, block.mlp.W_out, model.unembed.W_U):
        assert weight.T.contiguous().data_ptr() == weight.data_ptr()
    out = einops.rearrange(block.attn.W_O, "head_index d_head d_model -> d_model (head_index d_head)")
    assert out.is_contiguous()
    for weight in (block.attn.W_Q, block.attn._W_K, block.attn._W_V):
        read = einops.rearrange(weight, "head_index d_model d_head -> (head_index d_head) d_model")
        assert read.is_contiguous()
        assert read.data_ptr() == weight.data_ptr()


def test_second_call_changes_nothing():
    _, model = _contiguous_copy("tiny-llama")
    assert use_linear_layout(model) == 0


def test_loaded_smollm2_uses_layout(smollm2):
    assert use_linear_layout(smollm2) == 0
    mlp = smollm2.blocks[3].mlp
    assert mlp.W_out.T.is_contiguous()
