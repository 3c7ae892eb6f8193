"""Per-example SAE latent statistics in a ``FeatureTable``.

Each example is run alone as a one-demonstration prompt (``[BOS] input label``)
with SAEs attached (``actsel.sae.attach``). The latents of the tokens in a span
of the example are reduced to the statistics in ``SAE_STATISTICS``. The table
uses the hook name plus ``.sae`` (``blocks.15.hook_resid_post.sae``), so
correlation heatmaps and selectors read SAE features like raw activation
statistics.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.activations.table import FEATURE_KEYS, FeatureTable
from actsel.prompts import PromptBuilder, collate
from actsel.prompts.batch import batches_by_length
from actsel.prompts.builder import Prompt
from actsel.sae.attach import SAE_HOOK_SUFFIX, attach_saes, layer_of_hook, resolve_saes, sae_d_in
from actsel.tasks.base import Example, Task

logger = logging.getLogger(__name__)

SAE_STATISTICS = (
    "l0",
    "latent_mean",
    "latent_max",
    "latent_active_mean",
    "latent_variance",
    "latent_skewness",
    "latent_kurtosis",
    "top_latent_by_activation",
    "top_latent_by_frequency",
)
SAE_SPANS = ("example", "input", "label", "last")
SAE_CONTEXTS = ("alone",)
TOP_LATENTS = 10


def latent_statistics(latents: np.ndarray) -> dict[str, float]:
    """Reduce the latents of one span to ``SAE_STATISTICS``.

    Args:
        latents: latent activations of shape (n_tokens, d_sae); any float dtype, reduced in float64.

    Returns:
        ``l0``: mean number of non-zero latents per token. ``latent_mean``, ``latent_variance`` (population,
        ddof 0), ``latent_skewness`` and ``latent_kurtosis`` (excess, biased estimators as
        ``scipy.stats.skew`` / ``kurtosis`` with ``bias=True``): moments of all n_tokens * d_sae values.
        ``latent_max``: the largest value. ``latent_active_mean``: mean of the non-zero values (NaN if none).
        ``top_latent_by_activation``: the latent with the largest activation summed over tokens;
        ``top_latent_by_frequency``: the latent non-zero on the most tokens, ties broken by summed activation.
        Both are NaN when no latent fires. Skewness and kurtosis are NaN when all values are equal.
    """
    values = np.asarray(latents, dtype=np.float64)
    active = values != 0
    flat = values.ravel()
    mean = flat.mean()
    centred = flat - mean
    variance = np.mean(centred**2)
    if variance > 0:
        skewness = np.mean(centred**3) / variance**1.5
        kurtosis = np.mean(centred**4) / variance**2 - 3.0
    else:
        skewness = kurtosis = np.nan
    n_active = int(active.sum())
    statistics = {
        "l0": float(active.sum(axis=1).mean()),
        "latent_mean": float(mean),
        "latent_max": float(flat.max()),
        "latent_active_mean": float(values[active].mean()) if n_active else np.nan,
        "latent_variance": float(variance),
        "latent_skewness": float(skewness),
        "latent_kurtosis": float(kurtosis),
        "top_latent_by_activation": np.nan,
        "top_latent_by_frequency": np.nan,
    }
    if n_active:
        by_activation, by_frequency = top_latents(values, 1)
        statistics["top_latent_by_activation"] = float(by_activation[0])
        statistics["top_latent_by_frequency"] = float(by_frequency[0])
    return statistics


def top_latents(latents: np.ndarray, k: int = TOP_LATENTS) -> tuple[list[int], list[int]]:
    """Indices of the ``k`` latents with the largest summed activation and the ``k`` most often non-zero.

    Only latents that fire at least once are listed, so a list may be shorter than ``k``. Frequency ties
    are broken by summed activation.
    """
    values = np.asarray(latents, dtype=np.float64)
    total = values.sum(axis=0)
    frequency = (values != 0).sum(axis=0)
    fired = np.flatnonzero(frequency > 0)
    by_activation = fired[np.argsort(-total[fired], kind="stable")][:k]
    # lexsort sorts by the last key first: frequency, then summed activation.
    by_frequency = fired[np.lexsort((-total[fired], -frequency[fired]))][:k]
    return [int(i) for i in by_activation], [int(i) for i in by_frequency]


def _span_bounds(prompt: Prompt, span: str) -> tuple[int, int]:
    if span == "last":
        _, end = prompt.demo_span(0, "example")
        return end - 1, end
    return prompt.demo_span(0, span)


def _mask_name(mask: str | Callable) -> str:
    return mask if isinstance(mask, str) else getattr(mask, "__name__", type(mask).__name__)


def _attention_mask_context(model: HookedTransformer, prompts: Sequence[Prompt], mask, width: int):
    """Return a context manager that applies ``mask`` to the batch; causal attention needs none."""
    if mask == "causal":
        return contextlib.nullcontext()
    try:
        from actsel.masks import batch_allowed
        from actsel.masks.hooks import masked_attention
    except ImportError as err:
        raise ValueError(
            f"Mask {_mask_name(mask)!r} needs actsel.masks, which is not available; use mask='causal'."
        ) from err
    allowed = batch_allowed(prompts, mask, width).to(model.cfg.device)
    return masked_attention(model, allowed)


def _stop_layer(hook_names: Sequence[str]) -> int | None:
    layers = [layer_of_hook(name) for name in hook_names]
    if any(layer < 0 for layer in layers):
        return None
    return max(layers) + 1


def extract_sae_features(
    model: HookedTransformer,
    task: Task,
    sae_or_saes,
    examples: Sequence[Example] | None = None,
    *,
    mask: str | Callable | None = "causal",
    spans: Sequence[str] = ("example",),
    context: str = "alone",
    batch_size: int = 16,
    progress: bool = True,
) -> FeatureTable:
    """Compute SAE latent statistics of each example, one column per (hook, span, statistic).

    Args:
        model: the model the SAEs were trained on.
        task: renders the examples.
        sae_or_saes: one SAE, a sequence of SAEs recording their hook points, or ``{hook_name: sae}``.
        examples: examples to featurise; defaults to ``task.pool``.
        mask: attention mask strategy name or callable from ``actsel.masks``; "causal" needs nothing else.
        spans: token spans of the example to pool over, from ``SAE_SPANS``: "example" (input and label),
            "input", "label", "last" (the example's last token).
        context: "alone", the example as the only demonstration of a prompt without a query.
        batch_size: prompts per forward pass.
        progress: show a progress bar.

    Returns:
        A ``FeatureTable`` with ``n_examples`` rows and ``len(saes) * len(spans) * len(SAE_STATISTICS)``
        columns; ``hook`` is the hook name plus ``.sae``. ``metadata["sae_top_latents"][hook][span][uid]``
        contains the ``TOP_LATENTS`` latent indices ranked ``by_activation`` and ``by_frequency``.
    """
    mask = "causal" if mask is None else mask
    if context not in SAE_CONTEXTS:
        raise ValueError(f"Unknown context {context!r}; valid: {list(SAE_CONTEXTS)}.")
    unknown = [span for span in spans if span not in SAE_SPANS]
    if unknown or not spans:
        raise ValueError(f"Unknown spans {unknown or list(spans)}; valid: {list(SAE_SPANS)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    saes = resolve_saes(sae_or_saes)
    examples = list(task.pool if examples is None else examples)
    if not examples:
        raise ValueError("No examples to featurise.")

    builder = PromptBuilder(task, model.tokenizer)
    prompts = [builder.build([example]) for example in examples]
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    stop_at_layer = _stop_layer(list(saes))

    hook_names = list(saes)
    n_per_example = len(hook_names) * len(spans) * len(SAE_STATISTICS)
    values = np.full((len(examples), n_per_example), np.nan)
    top_lists = {hook: {span: {} for span in spans} for hook in hook_names}
    groups = batches_by_length(prompts, batch_size)
    with attach_saes(model, saes) as capture:
        for rows in tqdm(groups, desc="SAE features", disable=not progress):
            batch = collate([prompts[row] for row in rows], pad_id, device=model.cfg.device)
            width = batch.tokens.shape[1]
            with torch.no_grad(), _attention_mask_context(model, batch.prompts, mask, width):
                model(batch.tokens, attention_mask=batch.attention_mask, return_type=None, stop_at_layer=stop_at_layer)
            for hook_index, hook_name in enumerate(hook_names):
                latents = capture.latents[hook_name].detach().to(torch.float64).cpu().numpy()
                for batch_row, row in enumerate(rows):
                    for span_index, span in enumerate(spans):
                        start, end = _span_bounds(prompts[row], span)
                        span_latents = latents[batch_row, start:end]
                        statistics = latent_statistics(span_latents)
                        offset = (hook_index * len(spans) + span_index) * len(SAE_STATISTICS)
                        values[row, offset : offset + len(SAE_STATISTICS)] = [statistics[s] for s in SAE_STATISTICS]
                        by_activation, by_frequency = top_latents(span_latents)
                        top_lists[hook_name][span][examples[row].uid] = {
                            "by_activation": by_activation,
                            "by_frequency": by_frequency,
                        }
            capture.clear()

    columns = pd.DataFrame(
        [
            (_mask_name(mask), hook_name + SAE_HOOK_SUFFIX, layer_of_hook(hook_name), span, statistic)
            for hook_name in hook_names
            for span in spans
            for statistic in SAE_STATISTICS
        ],
        columns=list(FEATURE_KEYS),
    )
    values[~np.isfinite(values)] = np.nan
    metadata = {
        "model": model.cfg.model_name,
        "task": task.name,
        "context": context,
        "mask": _mask_name(mask),
        "sae": {hook_name: _describe_sae(sae) for hook_name, sae in saes.items()},
        "sae_top_latents": {
            hook_name + SAE_HOOK_SUFFIX: {
                span: {example.uid: by_uid[example.uid] for example in examples} for span, by_uid in spans_top.items()
            }
            for hook_name, spans_top in top_lists.items()
        },
    }
    return FeatureTable(values, columns, [e.uid for e in examples], [e.label for e in examples], metadata)


def _describe_sae(sae: torch.nn.Module) -> dict:
    cfg = getattr(sae, "cfg", None)
    architecture = cfg.architecture() if cfg is not None and hasattr(cfg, "architecture") else type(sae).__name__
    d_sae = getattr(cfg, "d_sae", None) if cfg is not None else getattr(sae, "d_sae", None)
    return {"architecture": str(architecture), "d_in": sae_d_in(sae), "d_sae": d_sae}
