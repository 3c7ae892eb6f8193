"""Find massive activations: single values far larger than the rest of their layer.

A value ``a`` at a hook passes when ``|a| > 100`` and ``|a|`` is at least 1000
times the median ``|a|`` of that hook's output on the same prompt (all real
tokens and dimensions, padding excluded). On SmolLM2-135M these are the values
near 2.2e4 at token 0, dimension 507, in ``hook_resid_post`` from layer 11 on.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from transformer_lens import HookedTransformer

from actsel.activations.hooks import MASSIVE_MIN_ABS, MASSIVE_MIN_RATIO
from actsel.activations.names import layer_of, resolve_hooks, stop_layer
from actsel.prompts import Prompt, batches_by_length

MASSIVE_COLUMNS = ("prompt", "hook", "layer", "position", "token", "dimension", "value", "median_abs", "ratio")


def _as_token_lists(model: HookedTransformer, prompts: Sequence[Prompt | str | Sequence[int]]) -> list[np.ndarray]:
    tokens = []
    for prompt in prompts:
        if isinstance(prompt, Prompt):
            tokens.append(np.asarray(prompt.input_ids))
        elif isinstance(prompt, str):
            tokens.append(model.to_tokens(prompt, prepend_bos=True)[0].cpu().numpy())
        else:
            tokens.append(np.asarray(prompt, dtype=np.int64))
    return tokens


def find_massive_activations(
    model: HookedTransformer,
    prompts: Sequence[Prompt | str | Sequence[int]],
    hook: str | Sequence[str] = "hook_resid_post",
    layers: Sequence[int] | None = None,
    *,
    min_abs: float = MASSIVE_MIN_ABS,
    min_ratio: float = MASSIVE_MIN_RATIO,
    batch_size: int = 8,
) -> pd.DataFrame:
    """List every activation that passes the massive-activation criterion.

    Args:
        model: the HookedTransformer.
        prompts: ``Prompt`` objects, strings (tokenized with BOS) or token id lists.
        hook: hook name(s): full names, per-block suffixes, or the pattern
            ``"blocks.{L}.hook_resid_post"``; suffixes expand to ``layers``.
        layers: layers for suffixes; ``None`` for all.
        min_abs: the absolute threshold.
        min_ratio: the minimum ratio to the median |a| of the hook's output on
            the same prompt.
        batch_size: prompts per forward pass.

    Returns:
        DataFrame with the columns ``MASSIVE_COLUMNS``, one row per passing value,
        sorted by prompt, layer, position and dimension: ``prompt`` is the prompt's
        index, ``token`` the decoded token string, ``value`` the signed activation.
    """
    hook_names = resolve_hooks(model, hook, layers)
    token_lists = _as_token_lists(model, prompts)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    rows: list[tuple] = []

    def make_hook(lengths: list[int], prompt_indices: list[int]):
        def hook_fn(activations: torch.Tensor, hook) -> None:
            batch, width = activations.shape[:2]
            values = activations.reshape(batch, width, -1)
            for row, length in enumerate(lengths):
                real = values[row, :length].detach().to(torch.float64)
                magnitude = real.abs()
                median = float(np.median(magnitude.cpu().numpy()))
                passing = (magnitude > min_abs) & (magnitude >= min_ratio * median)
                for position, dimension in torch.nonzero(passing).tolist():
                    value = float(real[position, dimension])
                    token_id = int(token_lists[prompt_indices[row]][position])
                    rows.append((prompt_indices[row], hook.name, layer_of(hook.name), position,
                                 model.tokenizer.decode([token_id]), dimension, value, median,
                                 abs(value) / median if median > 0 else np.inf))
        return hook_fn

    stop_at_layer = stop_layer(hook_names)
    for indices in batches_by_length(token_lists, batch_size):
        lengths = [len(token_lists[i]) for i in indices]
        tokens = torch.full((len(indices), max(lengths)), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(tokens)
        for row, index in enumerate(indices):
            tokens[row, : lengths[row]] = torch.from_numpy(token_lists[index])
            attention_mask[row, : lengths[row]] = 1
        hook_fn = make_hook(lengths, indices)
        with model.hooks(fwd_hooks=[(name, hook_fn) for name in hook_names]), torch.no_grad():
            model(tokens.to(model.cfg.device), attention_mask=attention_mask.to(model.cfg.device), return_type=None,
                  stop_at_layer=stop_at_layer)
    frame = pd.DataFrame(rows, columns=list(MASSIVE_COLUMNS))
    return frame.sort_values(["prompt", "layer", "hook", "position", "dimension"], ignore_index=True)
