"""``extract_features``: activation statistics of every candidate example, as a ``FeatureTable``.

Each candidate is placed in a prompt (alone, or among other demonstrations and
a query), the prompts are batched by length and right-padded, and every batch
runs once per attention mask with ``collect_statistics`` hooks on the chosen
hook points. The hooks reduce each activation tensor to per-example span
statistics in float64 and drop it, so memory does not grow with the number of
layers kept. The forward pass stops after the last hooked block and never
computes logits.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.activations.hooks import STATISTICS, collect_statistics
from actsel.activations.names import layer_of, resolve_hooks, stop_layer
from actsel.activations.table import FeatureTable
from actsel.masks import MASK_STRATEGIES, batch_allowed, masked_attention
from actsel.prompts import Prompt, PromptBuilder, batches_by_length, collate
from actsel.tasks.base import Example, Task

logger = logging.getLogger(__name__)

SPANS = ("example", "input", "label", "last")
CONTEXTS = ("alone", "in_context")
MAX_NONFINITE_WARNINGS = 20


def mask_name(mask: str | Callable) -> str:
    """Return the name a mask gets in feature tables: its registry name, or the callable's ``__name__``."""
    return mask if isinstance(mask, str) else getattr(mask, "__name__", type(mask).__name__)


@dataclass
class ExtractionConfig:
    """Validated settings of one ``extract_features`` call (see there for the meaning of each field)."""

    masks: tuple
    spans: tuple[str, ...]
    context: str
    n_context: int
    skip_first_token: bool
    batch_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.context not in CONTEXTS:
            raise ValueError(f"Unknown context {self.context!r}; valid: {list(CONTEXTS)}.")
        unknown = [span for span in self.spans if span not in SPANS]
        if unknown or not self.spans:
            raise ValueError(f"Unknown spans {unknown or list(self.spans)}; valid: {list(SPANS)}.")
        if not self.masks:
            raise ValueError("masks is empty; give at least one mask, e.g. ('causal',).")
        for mask in self.masks:
            if isinstance(mask, str) and mask not in MASK_STRATEGIES:
                raise ValueError(f"Unknown mask {mask!r}; valid: {sorted(MASK_STRATEGIES)}, or pass a callable.")
            if not isinstance(mask, str) and not callable(mask):
                raise TypeError(f"A mask must be a strategy name or a callable, got {type(mask).__name__}.")
        names = [mask_name(mask) for mask in self.masks]
        if len(set(names)) != len(names):
            raise ValueError(f"Masks have duplicate names {names}; give each custom callable its own __name__.")
        if self.n_context < 0:
            raise ValueError(f"n_context must be at least 0, got {self.n_context}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")


def _example_rng(seed: int, uid: str) -> np.random.Generator:
    """Return a generator that depends only on the seed and the candidate, so chunked runs draw the same contexts."""
    return np.random.default_rng([seed, zlib.crc32(uid.encode("utf-8"))])


def build_candidate_prompts(
    builder: PromptBuilder, task: Task, examples: Sequence[Example], context: str, n_context: int, seed: int
) -> list[Prompt]:
    """Build one prompt per candidate; the candidate is always the last demonstration.

    ``"alone"`` gives BOS + candidate. ``"in_context"`` gives ``n_context`` other
    pool examples (drawn without replacement, never the candidate), the candidate,
    then a query drawn from ``task.eval`` (or from the pool when ``task.eval`` is
    empty). The draws depend only on ``seed`` and the candidate's uid.
    """
    if context == "alone":
        return [builder.build([example]) for example in examples]
    queries = task.eval or task.pool
    prompts = []
    for example in examples:
        rng = _example_rng(seed, example.uid)
        others = [other for other in task.pool if other.uid != example.uid]
        if len(others) < n_context:
            raise ValueError(
                f"n_context={n_context} but the pool has only {len(others)} examples besides {example.uid!r}."
            )
        picks = rng.choice(len(others), size=n_context, replace=False) if n_context else []
        query_choices = [query for query in queries if query.uid != example.uid]
        query = query_choices[int(rng.integers(len(query_choices)))]
        prompts.append(builder.build([others[i] for i in picks] + [example], query))
    return prompts


def span_masks(
    prompts: Sequence[Prompt], width: int, spans: Sequence[str], skip_first_token: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Build the token masks of each span of each prompt's candidate (its last demonstration).

    Returns:
        ``(masks, origin)``: span name -> bool tensor (batch, width), and the
        candidate's first token position per prompt (where ``argmax_pos`` counts from).
    """
    masks = {span: torch.zeros((len(prompts), width), dtype=torch.bool) for span in spans}
    origin = torch.zeros(len(prompts), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        candidate = prompt.n_demos - 1
        start, end = prompt.demo_span(candidate, "example")
        input_start, input_end = prompt.demo_span(candidate, "input")
        label_start, label_end = prompt.demo_span(candidate, "label")
        first = start + 1 if skip_first_token else start
        bounds = {
            "example": (first, end),
            "input": (max(first, input_start), input_end),
            "label": (max(first, label_start), label_end),
            "last": (end - 1, end),
        }
        for span in spans:
            lo, hi = bounds[span]
            masks[span][row, lo:hi] = True
        origin[row] = start
    return masks, origin


def _feature_columns(masks: Sequence[str], hook_names: Sequence[str], spans: Sequence[str]) -> pd.DataFrame:
    rows = [
        (mask, hook, layer_of(hook), span, statistic)
        for mask in masks for hook in hook_names for span in spans for statistic in STATISTICS
    ]
    return pd.DataFrame(rows, columns=["mask", "hook", "layer", "span", "statistic"])


def extract_features(
    model: HookedTransformer,
    task: Task,
    examples: Sequence[Example] | None = None,
    *,
    hooks: str | Sequence[str] = ("hook_mlp_out",),
    layers: Sequence[int] | None = None,
    masks: Sequence[str | Callable] = ("causal",),
    spans: Sequence[str] = ("example",),
    context: str = "alone",
    n_context: int = 3,
    skip_first_token: bool = False,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> FeatureTable:
    """Compute activation statistics of each example at each hook, layer, mask and span.

    Args:
        model: the HookedTransformer.
        task: the task whose templates render the examples.
        examples: the candidates; ``task.pool`` by default.
        hooks: full hook names or per-block suffixes expanded to ``layers``
            (see ``actsel.activations.names.resolve_hooks``).
        layers: layers for suffix hooks; ``None`` for all.
        masks: attention-mask strategies (names in ``actsel.masks.MASK_STRATEGIES``
            or callables); each runs its own forward pass.
        spans: ``"example"`` (input and label), ``"input"``, ``"label"``, ``"last"``
            (the example's last token).
        context: ``"alone"`` (BOS + example) or ``"in_context"`` (``n_context``
            other pool examples, the candidate, then an evaluation query).
        n_context: demonstrations placed before the candidate in context.
        skip_first_token: leave the example's first token out of the
            ``example`` and ``input`` spans. With BOS present no span contains
            BOS; this option is for the case where the example's first token is
            the attention sink (an isolated mask, or no BOS).
        batch_size: prompts per forward pass.
        seed: seed of the context draws.
        progress: show a progress bar.

    Returns:
        A ``FeatureTable`` with one row per example and one column per (mask, hook,
        layer, span, statistic), statistics as in ``actsel.activations.hooks.STATISTICS``.
        Statistics of a span that contains a non-finite activation are NaN, and
        each such case is logged and listed in ``metadata["nonfinite"]``.
    """
    examples = list(task.pool if examples is None else examples)
    if not examples:
        raise ValueError("No examples to extract; pass a non-empty list or a task with a pool.")
    config = ExtractionConfig(tuple(masks), tuple(spans), context, n_context, skip_first_token, batch_size, seed)
    hook_names = resolve_hooks(model, hooks, layers)
    stop_at_layer = stop_layer(hook_names)
    mask_names = [mask_name(mask) for mask in config.masks]
    device = model.cfg.device

    builder = PromptBuilder(task, model.tokenizer, max_tokens=model.cfg.n_ctx)
    prompts = build_candidate_prompts(builder, task, examples, context, n_context, seed)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    n_stats, n_spans = len(STATISTICS), len(config.spans)
    block = n_spans * n_stats  # columns per (mask, hook), in span-major order
    values = np.full((len(examples), len(mask_names) * len(hook_names) * block), np.nan)
    nonfinite_records: list[dict] = []

    batches = batches_by_length(prompts, batch_size)
    for indices in tqdm(batches, desc="Activation statistics", disable=not progress):
        batch = collate([prompts[i] for i in indices], pad_id, device=device)
        width = batch.tokens.shape[1]
        spans_by_name, origin = span_masks(batch.prompts, width, config.spans, skip_first_token)
        spans_by_name = {name: mask.to(device) for name, mask in spans_by_name.items()}
        for mask_index, mask in enumerate(config.masks):
            allowed = None if mask == "causal" else batch_allowed(batch.prompts, mask, width).to(device)
            with masked_attention(model, allowed), \
                    collect_statistics(model, hook_names, spans_by_name, origin.to(device)) as collector, \
                    torch.no_grad():
                model(batch.tokens, attention_mask=batch.attention_mask, return_type=None, stop_at_layer=stop_at_layer)
            for hook_index, hook_name in enumerate(hook_names):
                start = (mask_index * len(hook_names) + hook_index) * block
                stats = collector.values[hook_name].numpy()  # (span, statistic, batch)
                values[indices, start:start + block] = stats.transpose(2, 0, 1).reshape(len(indices), block)
                flagged = collector.nonfinite[hook_name].numpy()  # (span, batch)
                for span_index, row in zip(*np.nonzero(flagged)):
                    record = {"uid": examples[indices[row]].uid, "mask": mask_names[mask_index], "hook": hook_name,
                              "layer": layer_of(hook_name), "span": config.spans[span_index]}
                    nonfinite_records.append(record)
                    if len(nonfinite_records) <= MAX_NONFINITE_WARNINGS:
                        logger.warning("Non-finite activations for example %s at %s (mask %s, span %s); "
                                       "its statistics there are NaN", record["uid"], hook_name, record["mask"],
                                       record["span"])
    if len(nonfinite_records) > MAX_NONFINITE_WARNINGS:
        logger.warning("%d example/hook/span combinations had non-finite activations in all; see "
                       "metadata['nonfinite']", len(nonfinite_records))

    metadata = {
        "model": model.cfg.model_name,
        "task": task.name,
        "extraction": {
            "context": context, "n_context": n_context if context == "in_context" else 0, "seed": seed,
            "skip_first_token": skip_first_token, "masks": mask_names, "hooks": hook_names,
            "spans": list(config.spans), "statistics": list(STATISTICS), "dtype": str(model.cfg.dtype),
        },
        "nonfinite": nonfinite_records,
    }
    if context == "in_context":
        metadata["contexts"] = [
            {"uid": example.uid, "demos": prompt.demo_uids[:-1], "query": prompt.query_uid}
            for example, prompt in zip(examples, prompts)
        ]
    return FeatureTable(
        values=values,
        columns=_feature_columns(mask_names, hook_names, config.spans),
        uids=[example.uid for example in examples],
        labels=[example.label for example in examples],
        metadata=metadata,
    )
