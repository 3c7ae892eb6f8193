"""Attention-masking strategies: which key positions each query position may attend.

A strategy maps a ``Prompt`` to a boolean (pos, pos) matrix, True where query
row ``i`` may attend key column ``j``. ``allowed_matrix`` always intersects the
result with the causal mask and sets the diagonal, because a row with no
allowed key would make the softmax produce NaN, which TransformerLens silently
turns into an all-zero pattern. ``batch_allowed`` pads per-prompt matrices to a
batch for ``actsel.masks.hooks.masked_attention``.

Strategies read only the prompt's segment map (``roles`` and ``demo_index``),
so they work for any tokenizer and task.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool

from actsel.prompts.builder import ROLE_DEMO_LABEL, ROLE_QUERY_ANSWER, ROLE_QUERY_INPUT, Prompt

MaskStrategy = Callable[[Prompt], np.ndarray]
MASK_STRATEGIES: dict[str, MaskStrategy] = {}


def register_mask(name: str) -> Callable[[MaskStrategy], MaskStrategy]:
    """Register a strategy under ``name``; raises ValueError if the name is taken."""

    def decorator(function: MaskStrategy) -> MaskStrategy:
        if name in MASK_STRATEGIES:
            raise ValueError(f"Mask strategy {name!r} is already registered; choose another name.")
        MASK_STRATEGIES[name] = function
        return function

    return decorator


def _causal(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n), dtype=bool))


@register_mask("causal")
def causal_mask(prompt: Prompt) -> np.ndarray:
    """Let every token attend to itself and all earlier tokens."""
    return _causal(len(prompt))


def _isolated(prompt: Prompt, keep_sink: bool) -> np.ndarray:
    allowed = _causal(len(prompt))
    demo = np.asarray(prompt.demo_index)
    in_demo = demo >= 0
    # A demonstration row keeps only the keys of its own block (input, label
    # and the separator after it). BOS and query rows keep their causal rows.
    same_block = demo[:, None] == demo[None, :]
    allowed[in_demo] &= same_block[in_demo]
    if keep_sink:
        allowed[in_demo, 0] = True
    return allowed


@register_mask("isolated")
def isolated_mask(prompt: Prompt) -> np.ndarray:
    """Restrict each demonstration block to itself, without BOS; BOS and query rows stay causal."""
    return _isolated(prompt, keep_sink=False)


@register_mask("isolated_sink")
def isolated_sink_mask(prompt: Prompt) -> np.ndarray:
    """Restrict each demonstration block to itself and position 0 (the attention sink)."""
    return _isolated(prompt, keep_sink=True)


@register_mask("label_blind")
def label_blind_mask(prompt: Prompt) -> np.ndarray:
    """Hide the demonstrations' label tokens from the query tokens (query input and query answer)."""
    allowed = _causal(len(prompt))
    roles = np.asarray(prompt.roles)
    query_rows = (roles == ROLE_QUERY_INPUT) | (roles == ROLE_QUERY_ANSWER)
    label_columns = roles == ROLE_DEMO_LABEL
    allowed[np.ix_(query_rows, label_columns)] = False
    return allowed


@register_mask("sink_free")
def sink_free_mask(prompt: Prompt) -> np.ndarray:
    """Hide position 0 from every token except token 0 itself."""
    allowed = _causal(len(prompt))
    allowed[1:, 0] = False
    return allowed


def _strategy_name(strategy: str | MaskStrategy) -> str:
    return strategy if isinstance(strategy, str) else getattr(strategy, "__name__", repr(strategy))


def allowed_matrix(prompt: Prompt, strategy: str | MaskStrategy = "causal") -> np.ndarray:
    """Compute the attention permissions of one prompt.

    Args:
        prompt: the prompt whose segment map defines the blocks.
        strategy: a name in ``MASK_STRATEGIES`` or a callable from the prompt to a
            (pos, pos) bool matrix.

    Returns:
        Bool array of shape (pos, pos), True where query row ``i`` may attend key
        column ``j``. It is always within the causal mask (``j <= i``) and its
        diagonal is always True.
    """
    n = len(prompt)
    if isinstance(strategy, str):
        if strategy not in MASK_STRATEGIES:
            raise ValueError(f"Unknown mask {strategy!r}; valid: {sorted(MASK_STRATEGIES)}, or pass a callable.")
        function = MASK_STRATEGIES[strategy]
    elif callable(strategy):
        function = strategy
    else:
        raise TypeError(
            f"mask must be a strategy name or a callable Prompt -> bool matrix, got {type(strategy).__name__}."
        )
    allowed = np.asarray(function(prompt))
    if allowed.shape != (n, n):
        raise ValueError(
            f"Mask {_strategy_name(strategy)!r} returned shape {allowed.shape} for a prompt of {n} tokens; "
            f"expected ({n}, {n})."
        )
    if allowed.dtype != bool:
        if not np.isin(allowed, (0, 1)).all():
            raise ValueError(
                f"Mask {_strategy_name(strategy)!r} returned values other than 0/1/True/False; return a bool matrix."
            )
        allowed = allowed.astype(bool)
    allowed = allowed & _causal(n)
    np.fill_diagonal(allowed, True)
    return allowed


def batch_allowed(
    prompts: Sequence[Prompt], strategy: str | MaskStrategy, width: int
) -> Bool[torch.Tensor, "batch pos pos"]:
    """Stack the permissions of right-padded prompts into one tensor.

    Args:
        prompts: the batch's prompts, in batch order.
        strategy: as in ``allowed_matrix``.
        width: padded length of the batch (at least the longest prompt).

    Returns:
        Bool tensor of shape (batch, width, width). Each prompt's matrix fills the
        top-left corner; padding rows and columns allow only the diagonal.
    """
    lengths = [len(prompt) for prompt in prompts]
    if lengths and max(lengths) > width:
        raise ValueError(f"width {width} is shorter than the longest prompt ({max(lengths)} tokens).")
    allowed = np.zeros((len(prompts), width, width), dtype=bool)
    diagonal = np.arange(width)
    allowed[:, diagonal, diagonal] = True
    for row, prompt in enumerate(prompts):
        n = lengths[row]
        allowed[row, :n, :n] = allowed_matrix(prompt, strategy)
    return torch.from_numpy(allowed)
