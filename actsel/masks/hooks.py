"""Apply a boolean attention mask during a TransformerLens forward pass.

``masked_attention`` hooks ``blocks.{L}.attn.hook_attn_scores``. In
TransformerLens 3.9 (``components/abstract_attention.py``) that hook point
fires after the causal and padding masks and before the softmax, on scores of
shape (batch, head, query_pos, key_pos) with grouped key heads already repeated
to the query heads. Adding a large negative number there removes a key from the
softmax exactly in float32, so the masked key behaves as if deleted, while the
token positions and therefore the rotary phases stay unchanged. The model's
``attention_mask`` argument cannot do this: it only marks padding, and a zero
in mid-sequence also shifts the rotary positions of later tokens, because
TransformerLens derives them from its cumulative sum.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from jaxtyping import Bool, Float
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

MASKED_SCORE = -1e9  # exp(-1e9 - max) is exactly 0 in float32; becomes -inf in float16, also exact


def _additive_mask(
    allowed: torch.Tensor, batch: int, n_query: int, n_key: int, scores: torch.Tensor, name: str | None
) -> Float[torch.Tensor, "batch 1 q k"]:
    """Turn the permissions into an additive score mask for ``n_query`` queries over ``n_key`` keys.

    With a KV cache of P positions the scores have ``n_key = P + n_query``
    columns and their rows are the last ``n_query`` key positions. ``allowed``
    may then contain just those rows (``allowed.shape[-1] == n_key``), or be the
    square mask of the whole sequence (width at least ``n_key``), of which the
    rows ``P .. n_key - 1`` and the first ``n_key`` columns apply.
    """
    rows_total, width = allowed.shape[-2], allowed.shape[-1]
    if allowed.shape[0] in (1, batch) and width == n_key and rows_total >= n_query:
        rows = allowed[:, rows_total - n_query :, :]
    elif allowed.shape[0] in (1, batch) and rows_total == width and width > n_key:
        rows = allowed[:, n_key - n_query : n_key, :n_key]
    else:
        raise ValueError(
            f"Mask of shape {tuple(allowed.shape)} does not fit attention scores of shape "
            f"{tuple(scores.shape)} at {name}: expected (batch or 1, q, {n_key}) with q >= {n_query}, or a "
            f"square (batch or 1, width, width) mask with width >= {n_key}. Build it with "
            f"batch_allowed(prompts, strategy, width=<total key length>)."
        )
    additive = torch.zeros(rows.shape, dtype=scores.dtype, device=scores.device)
    additive.masked_fill_(~rows.to(scores.device), MASKED_SCORE)
    return additive[:, None]  # broadcast over heads


def _make_hook(allowed: torch.Tensor):
    cache: dict[tuple, torch.Tensor] = {}

    def hook(scores: Float[torch.Tensor, "batch head q k"], hook: HookPoint) -> torch.Tensor:
        batch, _, n_query, n_key = scores.shape
        key = (scores.device, scores.dtype, batch, n_query, n_key)
        if key not in cache:
            cache[key] = _additive_mask(allowed, batch, n_query, n_key, scores, hook.name)
        return scores + cache[key]

    return hook


@contextlib.contextmanager
def masked_attention(
    model: HookedTransformer,
    allowed: Bool[torch.Tensor, "batch q k"] | None,
    layers: Iterable[int] | None = None,
) -> Iterator[HookedTransformer]:
    """Mask attention in ``layers`` (all by default) while the context is open.

    Args:
        model: the HookedTransformer to hook.
        allowed: bool tensor of shape (batch, q, k), or (1, q, k) to broadcast,
            True where a query may attend a key (see ``batch_allowed``). Its rows
            are matched to the last rows of the scores, so a mask over the full
            sequence also works when a KV cache contains a prefix of ``k - q``
            positions. ``None`` adds no hooks.
        layers: layer indices to mask; ``None`` for every layer.

    Yields:
        The model. The hooks are removed on exit, also on error.
    """
    if allowed is None:
        yield model
        return
    if not isinstance(allowed, torch.Tensor) or allowed.dtype != torch.bool or allowed.ndim != 3:
        raise ValueError("allowed must be a bool tensor of shape (batch, q, k); build it with batch_allowed().")
    layer_list = list(range(model.cfg.n_layers)) if layers is None else [int(layer) for layer in layers]
    invalid = [layer for layer in layer_list if not 0 <= layer < model.cfg.n_layers]
    if invalid:
        raise ValueError(f"Layers {invalid} are out of range; the model has layers 0..{model.cfg.n_layers - 1}.")
    hook = _make_hook(allowed)
    fwd_hooks = [(f"blocks.{layer}.attn.hook_attn_scores", hook) for layer in layer_list]
    with model.hooks(fwd_hooks=fwd_hooks):
        yield model
