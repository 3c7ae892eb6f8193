"""Store weights in the memory order that TransformerLens' matrix products read them in.

TransformerLens 3.9 keeps weights as (d_in, d_out) or (head, d_model, d_head).
Several components transpose them on every forward pass and call
``.contiguous()`` to give ``F.linear`` an (out, in) matrix. These are the gated
MLP's three matrices, the unembedding, the attention output ``W_O``, and
(inside a reshape) the query, key and value weights. Each such call copies the
whole matrix. For SmolLM2 that is 0.4 to 0.5 GB of copies per forward pass,
which can cost more than the arithmetic when a batch has few tokens.

``use_linear_layout`` gives each of these parameters the same shape and values
but strides such that the transposed view is already contiguous, so the copy
becomes a no-op. ``F.linear`` then receives the very matrix it received before,
so outputs are bitwise identical (``tests/test_layout.py``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components import AbstractAttention, Unembed
from transformer_lens.components.mlps.gated_mlp import GatedMLP

logger = logging.getLogger(__name__)

# Order in which each weight kind is read: the dimension permutation whose
# result TransformerLens makes contiguous before the product.
_MATRIX_READ = (1, 0)  # (d_in, d_out) read as (d_out, d_in)
_QKV_READ = (0, 2, 1)  # (head, d_model, d_head) read as (head, d_head, d_model)
_OUT_READ = (2, 0, 1)  # (head, d_head, d_model) read as (d_model, head, d_head)


def _relayout(parameter: nn.Parameter, read_order: tuple[int, ...]) -> None:
    """Keep ``parameter``'s shape and values, store it so that ``permute(read_order)`` is contiguous."""
    inverse = tuple(sorted(range(len(read_order)), key=read_order.__getitem__))
    with torch.no_grad():
        parameter.data = parameter.data.permute(read_order).contiguous().permute(inverse)


def _is_dense_parameter(module: nn.Module, name: str) -> bool:
    value = module._parameters.get(name)
    return isinstance(value, nn.Parameter) and value.dtype.is_floating_point


def use_linear_layout(model: HookedTransformer) -> int:
    """Re-store the weights that TransformerLens transposes on every call and return how many changed.

    Safe to call more than once. Quantised (4-bit) weights and components that
    use the weights as stored are left alone.
    """
    plan: list[tuple[nn.Module, str, tuple[int, ...]]] = []
    for module in model.modules():
        if isinstance(module, GatedMLP):
            plan += [(module, name, _MATRIX_READ) for name in ("W_gate", "W_in", "W_out")]
        elif isinstance(module, Unembed):
            plan.append((module, "W_U", _MATRIX_READ))
        elif isinstance(module, AbstractAttention):
            plan += [(module, name, _QKV_READ) for name in ("W_Q", "W_K", "W_V", "_W_K", "_W_V")]
            plan.append((module, "W_O", _OUT_READ))
    changed = 0
    for module, name, read_order in plan:
        if not _is_dense_parameter(module, name):
            continue
        parameter = module._parameters[name]
        if parameter.permute(read_order).is_contiguous():
            continue
        _relayout(parameter, read_order)
        changed += 1
    logger.debug("Re-stored %d weight matrices in read order", changed)
    return changed
