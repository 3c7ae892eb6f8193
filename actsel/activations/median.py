"""Per-row median of the activation magnitudes in a span, without sorting the span.

``span_median`` is exact: for each row it returns what ``numpy.median``
returns for the float32 magnitudes of its in-span values. A histogram over the
top bits of the values' float32 bit patterns finds the bin that contains each
middle value. Only the values in that bin, a few percent of the span, are sorted.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int

from actsel.activations.workspace import Workspace

MEDIAN_BIN_SHIFT = 18  # bins of the float32 bit pattern: 8 exponent bits and 5 mantissa bits
MEDIAN_BINS = 1 << (31 - MEDIAN_BIN_SHIFT)
SMALL_SPAN_VALUES = 1024  # up to this many values per row, select directly instead of binning (faster there)


def _select_small(
    bits: Int[torch.Tensor, "batch pos d"], in_span: Bool[torch.Tensor, "batch pos"], longest: int
) -> tuple[Float[torch.Tensor, " batch"], Float[torch.Tensor, " batch"]]:
    """Return the lower and upper middle values of each row, selected in a NaN-padded (batch, longest x d) copy."""
    batch, _, d = bits.shape
    row = in_span.nonzero()[:, 0]
    slot = (in_span.cumsum(-1) - 1)[in_span]
    padded = torch.full((batch, longest, d), torch.nan, dtype=torch.float32, device=bits.device)
    padded[row, slot] = bits[in_span].view(torch.float32)
    padded = padded.reshape(batch, -1)
    lower = padded.nanmedian(dim=-1).values.to(torch.float64)
    upper = -(-padded).nanmedian(dim=-1).values.to(torch.float64)
    return lower, upper


def span_median(
    bits: Int[torch.Tensor, "batch pos d"],
    in_span: Bool[torch.Tensor, "batch pos"],
    workspace: Workspace | None = None,
) -> Float[torch.Tensor, " batch"]:
    """Return the median of each row's in-span values as ``numpy.median`` defines it (float64; NaN for an empty span).

    Args:
        bits: int32 bit patterns of non-negative float32 magnitudes, which
            order like the values.
        in_span: True for the tokens of each row's span.
        workspace: scratch tensors to reuse between calls; a fresh one when ``None``.
    """
    batch, _, d = bits.shape
    device = bits.device
    empty = torch.full((batch,), torch.nan, dtype=torch.float64, device=device)
    count = in_span.sum(-1) * d
    longest = int(in_span.sum(-1).max())
    if longest == 0:
        return empty
    if longest * d <= SMALL_SPAN_VALUES:
        lower, upper = _select_small(bits, in_span, longest)
        return torch.where(count > 0, (lower + upper) / 2, empty)

    # NOTE: this path was tested on the CPU only; on CUDA, bincount and searchsorted are untested here.
    workspace = workspace if workspace is not None else Workspace()
    token_row = in_span.nonzero()[:, 0]  # row of each in-span token, ascending
    tokens = token_row.numel()
    flat = bits.reshape(-1, d)
    span_bits = workspace.get("median_values", flat.shape, torch.int32, device)[:tokens]
    torch.index_select(flat, 0, in_span.reshape(-1).nonzero()[:, 0], out=span_bits)
    # Row r counts into bins [r * MEDIAN_BINS, (r + 1) * MEDIAN_BINS).
    row_start = token_row.to(torch.int32) * MEDIAN_BINS  # (tokens,)
    binned = workspace.get("median_bins", flat.shape, torch.int32, device)[:tokens]
    torch.bitwise_right_shift(span_bits, MEDIAN_BIN_SHIFT, out=binned)
    binned.add_(row_start[:, None])
    histogram = torch.bincount(binned.view(-1), minlength=batch * MEDIAN_BINS)
    cumulative = histogram.reshape(batch, MEDIAN_BINS).cumsum(-1)

    low_rank = ((count - 1) // 2).clamp_min(0)  # 0-based ranks of the two middle values
    high_rank = count // 2
    low_bin = torch.searchsorted(cumulative, low_rank[:, None], right=True).clamp_max(MEDIAN_BINS - 1)[:, 0]
    high_bin = torch.searchsorted(cumulative, high_rank[:, None], right=True).clamp_max(MEDIAN_BINS - 1)[:, 0]
    below = torch.where(low_bin > 0, cumulative.gather(1, (low_bin - 1).clamp_min(0)[:, None])[:, 0], 0)
    first_bin = low_bin.to(torch.int32)[token_row] + row_start  # (tokens,): the global bin of each token's row
    chosen = workspace.get("median_chosen", flat.shape, torch.bool, device)[:tokens]
    if bool((low_bin == high_bin).all()):  # the usual case: both middle values share a bin
        torch.eq(binned, first_bin[:, None], out=chosen)
    else:
        last_bin = high_bin.to(torch.int32)[token_row] + row_start
        torch.ge(binned, first_bin[:, None], out=chosen)
        chosen &= binned <= last_bin[:, None]
    token, column = chosen.nonzero(as_tuple=True)
    row = token_row[token]
    ordered = ((row << 31) | span_bits[token, column].to(torch.int64)).sort().values
    values = (ordered & 0x7FFFFFFF).to(torch.int32).view(torch.float32).to(torch.float64)
    per_row = torch.bincount(row, minlength=batch)
    start = per_row.cumsum(0) - per_row
    last = values.numel() - 1
    low = values[(start + low_rank - below).clamp(0, last)]
    high = values[(start + high_rank - below).clamp(0, last)]
    return torch.where(count > 0, (low + high) / 2, empty)
