"""Reduce activations to per-example span statistics inside forward hooks.

``span_statistics`` turns one hook's activations of a right-padded batch into
the statistics named in ``STATISTICS`` for every span, all in float64.
``collect_statistics`` attaches it to a list of hook points for one forward
pass and returns the results, so the activations themselves are freed as soon
as each hook returns and only (span, statistic, batch) numbers are kept.

Spans are boolean (batch, pos) token masks built by the caller; positions are
reported relative to ``origin`` (the first token of each example).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from actsel.activations import cpu_kernel
from actsel.activations.median import span_median
from actsel.activations.moments import combine_tokens, token_moments
from actsel.activations.workspace import Workspace

MOMENT_STATISTICS = ("mean", "variance", "skewness", "kurtosis")
TOKEN_STATISTICS = ("token_mean", "token_variance", "token_skewness", "token_kurtosis")
MASSIVE_STATISTICS = ("max_abs", "max_over_median", "count_above_100", "count_massive", "argmax_pos", "argmax_dim")
STATISTICS = MOMENT_STATISTICS + TOKEN_STATISTICS + MASSIVE_STATISTICS

MASSIVE_MIN_ABS = cpu_kernel.MASSIVE_MIN_ABS  # absolute threshold of a massive activation
MASSIVE_MIN_RATIO = cpu_kernel.MASSIVE_MIN_RATIO  # and its minimum ratio to the median |a| of the same values


def _derived(n, m2, m3, m4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Population variance, skewness and excess kurtosis from central sums; NaN when m2 == 0."""
    variance = m2 / n
    safe = m2 > 0
    skewness = torch.where(safe, torch.sqrt(n) * m3 / m2.clamp_min(1e-300) ** 1.5, torch.nan)
    kurtosis = torch.where(safe, n * m4 / m2.clamp_min(1e-300) ** 2 - 3.0, torch.nan)
    return variance, skewness, kurtosis


def span_statistics(
    activations: Float[torch.Tensor, "batch pos d_model"],
    spans: Sequence[Bool[torch.Tensor, "batch pos"]],
    origin: Int[torch.Tensor, " batch"],
    workspace: Workspace | None = None,
    compiled: bool | None = None,
) -> tuple[Float[torch.Tensor, "span statistic batch"], Bool[torch.Tensor, "span batch"]]:
    """Compute every statistic in ``STATISTICS`` over each span of each row.

    Moments come from per-token moments merged over the span (exact, float64).
    Maxima come from per-token maxima. Medians come from a histogram of the
    values' bit patterns and a sort of the few values in the middle bin.
    Maxima, medians and counts use float32 magnitudes (exact for float32,
    float16 and bfloat16 activations; float64 ones are rounded there).
    Massive values are counted among the few values above the absolute
    threshold. No full sort of the activations is needed.

    Args:
        activations: one hook's output; dimensions after ``pos`` are flattened,
            so ``hook_z`` (batch, pos, head, d_head) also works.
        spans: token masks, each of shape (batch, pos), all on the activations' device.
        origin: position that ``argmax_pos`` counts from, per row.
        workspace: scratch tensors to reuse between calls (hooks of one batch
            share a shape); a fresh one when ``None``.
        compiled: use the Numba kernel of ``actsel.activations.cpu_kernel``
            (CPU tensors only) instead of tensor operations. ``None`` picks it
            for CPU activations when Numba is installed. Both give the same
            values up to float64 rounding of the moments.

    Returns:
        ``(values, nonfinite)``: float64 statistics of shape (n_spans,
        n_statistics, batch) in ``STATISTICS`` order, and a flag per span and
        row that the span contains a value that is not finite. Flagged entries and
        empty spans are NaN.
    """
    batch, width = activations.shape[:2]
    values = activations.detach().reshape(batch, width, -1)
    d = values.shape[-1]
    if compiled is None:
        compiled = values.device.type == "cpu" and cpu_kernel.available()
    if compiled:
        return cpu_kernel.span_statistics_cpu(values, torch.stack(list(spans)), origin, len(STATISTICS))

    workspace = workspace if workspace is not None else Workspace()
    stats = token_moments(values, workspace)
    token_variance, token_skewness, token_kurtosis = _derived(torch.full_like(stats[0], d), *stats[1:])
    token_finite = torch.isfinite(stats[0])  # a float64 sum of float32 values is finite if and only if they all are

    magnitude = workspace.get("magnitude", values.shape, torch.float32, values.device)
    magnitude.copy_(values).abs_()  # exact for float16/bfloat16/float32 inputs
    bits = magnitude.view(torch.int32).bitwise_and_(0x7FFFFFFF)  # shares storage; clears the sign bit NaN may keep
    token_max = magnitude.amax(dim=-1)  # (batch, pos); measured: a tenth of the time of max() with indices
    # Values above the absolute threshold are few, so they are counted and located
    # only in the tokens whose maximum passes it.
    hot_row, hot_pos = torch.nonzero(token_max > MASSIVE_MIN_ABS, as_tuple=True)
    hot_above = magnitude[hot_row, hot_pos] > MASSIVE_MIN_ABS  # (hot tokens, d)
    token_above = torch.zeros(token_max.shape, dtype=torch.int64, device=token_max.device)
    token_above[hot_row, hot_pos] = hot_above.sum(-1)
    hot_token, above_dim = torch.nonzero(hot_above, as_tuple=True)
    above_row, above_pos = hot_row[hot_token], hot_pos[hot_token]
    above_value = magnitude[above_row, above_pos, above_dim].to(torch.float64)

    # Every span at once: (span, batch, pos) masks broadcast against (batch, pos) per-token values.
    in_span = torch.stack(list(spans))
    n, mean, m2, m3, m4 = combine_tokens(stats, in_span, d)
    variance, skewness, kurtosis = _derived(n, m2, m3, m4)
    tokens = in_span.sum(-1).to(torch.float64)

    def token_average(per_token: torch.Tensor) -> torch.Tensor:
        return torch.where(in_span, per_token, 0.0).sum(-1) / tokens

    max_abs, max_pos = torch.where(in_span, token_max, -1.0).max(dim=-1)
    max_abs = max_abs.to(torch.float64)
    # The dimension of the maximum, searched only in the one token per span and row that contains it.
    max_dim = magnitude[torch.arange(batch, device=values.device), max_pos].argmax(dim=-1)
    median = torch.stack([span_median(bits, span, workspace) for span in spans])
    is_massive = in_span[:, above_row, above_pos] & (above_value >= MASSIVE_MIN_RATIO * median[:, above_row])
    count_massive = torch.zeros_like(median).index_add_(1, above_row, is_massive.to(torch.float64))

    columns = [
        mean, variance, skewness, kurtosis,
        token_average(stats[0]), token_average(token_variance),
        token_average(token_skewness), token_average(token_kurtosis),
        max_abs, max_abs / median,
        torch.where(in_span, token_above, 0).sum(-1).to(torch.float64), count_massive,
        (max_pos - origin).to(torch.float64), max_dim.to(torch.float64),
    ]
    results = torch.stack(columns, dim=1)  # (span, statistic, batch)
    nonfinite = (in_span & ~token_finite).any(-1)
    results.masked_fill_((nonfinite | (tokens == 0))[:, None, :], torch.nan)
    return results, nonfinite


class StatisticsCollector:
    """Forward hooks that store ``span_statistics`` of each hook point for one batch.

    Args:
        spans: span name -> token mask of shape (batch, pos).
        origin: position that ``argmax_pos`` counts from, per row.
    """

    def __init__(self, spans: Mapping[str, Bool[torch.Tensor, "batch pos"]], origin: Int[torch.Tensor, " batch"]):
        self.span_names = list(spans)
        self.spans = list(spans.values())
        self.origin = origin
        self.workspace = Workspace()
        self.values: dict[str, torch.Tensor] = {}
        self.nonfinite: dict[str, torch.Tensor] = {}

    def hook(self, activations: torch.Tensor, hook: HookPoint) -> None:
        batch, width = self.spans[0].shape
        if activations.shape[:2] != (batch, width):
            raise ValueError(
                f"Hook {hook.name} has output shape {tuple(activations.shape)}, not (batch={batch}, pos={width}, ...); "
                f"statistics need a per-token hook such as hook_resid_post, hook_mlp_out or mlp.hook_post."
            )
        values, nonfinite = span_statistics(activations, self.spans, self.origin, self.workspace)
        self.values[hook.name] = values.cpu()
        self.nonfinite[hook.name] = nonfinite.cpu()


@contextlib.contextmanager
def collect_statistics(
    model: HookedTransformer,
    hook_names: Sequence[str],
    spans: Mapping[str, Bool[torch.Tensor, "batch pos"]],
    origin: Int[torch.Tensor, " batch"],
) -> Iterator[StatisticsCollector]:
    """Attach a ``StatisticsCollector`` to ``hook_names`` while the context is open; hooks removed on exit."""
    collector = StatisticsCollector(spans, origin)
    with model.hooks(fwd_hooks=[(name, collector.hook) for name in hook_names]):
        yield collector
