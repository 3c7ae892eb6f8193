"""Resolve user hook names to TransformerLens hook points, with helpful errors."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence

from transformer_lens import HookedTransformer

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Hook points whose output is not (batch, pos, ...) per token.
_NOT_PER_TOKEN = ("hook_attn_scores", "hook_pattern")


def layer_of(hook_name: str) -> int:
    """Return the block index in ``blocks.{L}.…``, or -1 for hooks outside the blocks (``hook_embed``, ``ln_final``)."""
    match = _BLOCK.match(hook_name)
    return int(match.group(1)) if match else -1


def _unknown(name: str, model: HookedTransformer) -> ValueError:
    candidates = list(model.hook_dict)
    suffixes = sorted({_BLOCK.sub("", candidate) for candidate in candidates})
    close = difflib.get_close_matches(name, candidates + suffixes, n=5, cutoff=0.5)
    hint = f" Close matches: {close}." if close else ""
    return ValueError(
        f"Unknown hook {name!r} for {model.cfg.model_name}.{hint} Give a full TransformerLens name "
        f"('blocks.3.hook_mlp_out') or a per-block suffix expanded to every layer ('hook_mlp_out')."
    )


def resolve_hooks(model: HookedTransformer, hooks: str | Sequence[str], layers: Iterable[int] | None = None) -> list[str]:
    """Expand hook names to full hook-point names, in the order given and without duplicates.

    Args:
        model: the model whose ``hook_dict`` defines the valid names.
        hooks: full names (``"blocks.3.hook_mlp_out"``, ``"ln_final.hook_normalized"``)
            or per-block suffixes (``"hook_mlp_out"``, ``"mlp.hook_post"``) that expand
            to ``blocks.{L}.<suffix>`` for every layer in ``layers``. The pattern
            ``"blocks.{L}.hook_resid_post"`` is read as its suffix.
        layers: layers for the suffixes; ``None`` for all. Full names are kept as given.

    Raises:
        ValueError: for an unknown name (listing close matches), a layer out of
            range, or an attention-pattern hook, whose output is not per token.
    """
    if isinstance(hooks, str):
        hooks = [hooks]
    n_layers = model.cfg.n_layers
    layer_list = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    invalid = [layer for layer in layer_list if not 0 <= layer < n_layers]
    if invalid:
        raise ValueError(f"Layers {invalid} are out of range; {model.cfg.model_name} has layers 0..{n_layers - 1}.")
    resolved: list[str] = []
    for name in hooks:
        name = name.replace("blocks.{L}.", "").replace("blocks.{layer}.", "")
        if name.endswith(_NOT_PER_TOKEN):
            raise ValueError(f"Hook {name!r} outputs attention scores (batch, head, q, k), not per-token activations.")
        if name in model.hook_dict:
            expanded = [name]
        elif f"blocks.0.{name}" in model.hook_dict:
            expanded = [f"blocks.{layer}.{name}" for layer in layer_list]
        else:
            raise _unknown(name, model)
        resolved.extend(full for full in expanded if full not in resolved)
    return resolved


def stop_layer(hook_names: Sequence[str]) -> int | None:
    """Return the ``stop_at_layer`` that still runs every hook: last block + 1, or None when a hook is outside the blocks."""
    layers = [layer_of(name) for name in hook_names]
    if any(layer < 0 for layer in layers):
        return None
    # stop_at_layer == n_layers still returns before ln_final and the unembedding.
    return max(layers) + 1
