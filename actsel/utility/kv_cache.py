"""Run a shared prefix once, then many right-padded continuations against its keys and values.

Scoring one demonstration set on many queries repeats the same prefix (BOS and
the demonstrations) in every prompt. ``build_prefix_cache`` runs that prefix
once into a TransformerLens ``TransformerLensKeyValueCache`` (batch 1, all-ones
attention mask) and freezes it. ``run_continuations`` expands the cache to the
batch size as views and runs the continuations, each right-padded with its own
attention mask.

Positions stay correct under right padding: TransformerLens 3.9 derives the
rotary phases and absolute position ids of new tokens from the cumulative sum
of the concatenated attention mask (``get_offset_position_ids``). The prefix
mask is all ones, so continuation token ``t`` gets position ``P + t`` exactly as
in the unpadded full prompt, and padding sits after every real token, so it
shifts nothing. Cached keys are stored before the rotary rotation and rotated
again at every call with the same positions.

``run_continuations`` returns the final residual stream instead of logits,
because only a few positions per query are scored and the unembedding of every
position (vocabulary 49152 for SmolLM2) is a large share of the cost.
``logits_at`` then applies the final norm and unembedding to those positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.utilities.activation_functions import apply_softcap


@dataclass
class PrefixCache:
    """Keys and values of a prefix run once with batch size 1.

    Attributes:
        cache: frozen cache whose entries hold ``length`` positions.
        length: prefix length ``P`` in tokens.
    """

    cache: TransformerLensKeyValueCache
    length: int

    def expand(self, batch: int) -> TransformerLensKeyValueCache:
        """Return a frozen cache for ``batch`` rows that views this prefix's tensors without copying them."""
        entries = [
            TransformerLensKeyValueCacheEntry(
                past_keys=entry.past_keys.expand(batch, -1, -1, -1),
                past_values=entry.past_values.expand(batch, -1, -1, -1),
                frozen=True,
            )
            for entry in self.cache.entries
        ]
        attention_mask = self.cache.previous_attention_mask.expand(batch, -1)
        return TransformerLensKeyValueCache(entries=entries, previous_attention_mask=attention_mask, frozen=True)


def attention_hooks(model: HookedTransformer, allowed: Bool[torch.Tensor, "batch q k"] | None):
    """Return ``masked_attention(model, allowed)``, or a no-op context when ``allowed`` is None."""
    if allowed is None:
        return contextlib.nullcontext()
    from actsel.masks import masked_attention

    return masked_attention(model, allowed)


def model_device(model: HookedTransformer) -> torch.device:
    return model.W_U.device


def build_prefix_cache(
    model: HookedTransformer, prefix_ids: Int[np.ndarray, "pos"], allowed: Bool[np.ndarray, "pos pos"] | None = None
) -> PrefixCache:
    """Run ``prefix_ids`` once and keep its keys and values.

    Args:
        model: the model.
        prefix_ids: prefix token ids, shape (P,) with P >= 1.
        allowed: optional attention-mask matrix of the prefix, shape (P, P),
            True where row i may attend column j.
    """
    if len(prefix_ids) == 0:
        raise ValueError("A prefix cache needs at least one token; score without a prefix instead.")
    device = model_device(model)
    tokens = torch.as_tensor(np.asarray(prefix_ids), dtype=torch.long, device=device)[None]
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, batch_size=1)
    mask = None if allowed is None else torch.as_tensor(allowed, dtype=torch.bool, device=device)[None]
    with torch.no_grad(), attention_hooks(model, mask):
        model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    cache.freeze()
    return PrefixCache(cache=cache, length=len(prefix_ids))


def continuation_allowed(
    allowed: Sequence[Bool[np.ndarray, "full full"]], prefix_length: int, lengths: Sequence[int], width: int
) -> Bool[torch.Tensor, "batch q k"]:
    """Cut the continuation rows out of full-prompt mask matrices and pad them.

    Row r of the result is ``allowed[r][P:P+len_r, :P+len_r]`` padded to
    ``(width, P + width)``. Padding rows may attend only themselves, so no row
    is fully masked; real rows never attend padding columns.
    """
    total = prefix_length + width
    out = np.zeros((len(allowed), width, total), dtype=bool)
    out[:, np.arange(width), prefix_length + np.arange(width)] = True
    for row, (matrix, length) in enumerate(zip(allowed, lengths)):
        end = prefix_length + length
        if matrix.shape != (end, end):
            raise ValueError(f"Mask matrix of row {row} has shape {matrix.shape}, expected {(end, end)}.")
        out[row, :length, :end] = matrix[prefix_length:end, :end]
    return torch.from_numpy(out)


def run_continuations(
    model: HookedTransformer,
    rows: Sequence[Int[np.ndarray, "pos"]],
    pad_id: int,
    prefix: PrefixCache | None = None,
    allowed: Sequence[Bool[np.ndarray, "full full"]] | None = None,
) -> Float[torch.Tensor, "batch pos d_model"]:
    """Run right-padded token rows after an optional cached prefix; return the final residual stream.

    Args:
        model: the model.
        rows: token ids of each continuation (or of each whole prompt when
            ``prefix`` is None), not padded.
        pad_id: id placed in padding positions; it is never attended.
        prefix: cached prefix that precedes every row, or None.
        allowed: optional full-prompt mask matrix per row, shape
            (P + len_r, P + len_r), prefix rows included.

    Returns:
        Residual stream after the last block (before the final norm), shape
        (batch, width, d_model), where position t of row r is token ``P + t``
        of its full prompt.
    """
    device = model_device(model)
    lengths = [len(row) for row in rows]
    if min(lengths) < 1:
        raise ValueError("Every continuation needs at least one token.")
    width = max(lengths)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        tokens[index, : lengths[index]] = torch.as_tensor(np.asarray(row), dtype=torch.long)
        attention_mask[index, : lengths[index]] = 1
    prefix_length = 0 if prefix is None else prefix.length
    mask = None
    if allowed is not None:
        mask = continuation_allowed(allowed, prefix_length, lengths, width).to(device)
    cache = None if prefix is None else prefix.expand(len(rows))
    with torch.no_grad(), attention_hooks(model, mask):
        return model(
            tokens.to(device), attention_mask=attention_mask.to(device), past_kv_cache=cache,
            stop_at_layer=model.cfg.n_layers,
        )


def logits_at(
    model: HookedTransformer, residual: Float[torch.Tensor, "batch pos d_model"],
    batch_index: Sequence[int], positions: Sequence[int],
) -> Float[torch.Tensor, "n d_vocab"]:
    """Apply the final norm and unembedding at the given (row, position) pairs only."""
    with torch.no_grad():
        selected = residual[torch.as_tensor(batch_index), torch.as_tensor(positions)][:, None]  # (n, 1, d_model)
        if model.cfg.normalization_type is not None:
            selected = model.ln_final(selected)
        logits = apply_softcap(model.unembed(selected), model.cfg.output_logits_soft_cap)
    return logits[:, 0]
