"""Span statistics of CPU activations, compiled with Numba and computed one row at a time.

``span_statistics`` in ``hooks`` computes everything with tensor operations,
which on the CPU means about twenty passes over each hook's activations and
scratch tensors of several MB. Run inside a forward pass, whose weights evict
those scratch tensors from the cache between hooks, that made the statistics
cost as much as a fifth of the forward pass. This kernel reads each row's
activations twice for the per-token values, then twice per span for the
median (a histogram, then the values in the middle bins) and once more over
the few tokens containing a value above 100. Its scratch space is about 64 KB
per row (mostly the histogram). It returns the same (span, statistic, batch)
array as the tensor version. Rows run in parallel.

Moments are computed from the activations as given (float32, or float64 for
float64 input; float16 and bfloat16 are widened to float32 exactly). Maxima,
medians and counts use float32 magnitudes, as the tensor version does.

The tensor version stays the reference and the path for other devices;
``tests/test_cpu_kernel.py`` checks that both agree.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a declared dependency
    numba = None

MASSIVE_MIN_ABS = 100.0
MASSIVE_MIN_RATIO = 1000.0
BIN_SHIFT = 18  # histogram bins of the float32 bit pattern: 8 exponent bits and 5 mantissa bits
N_BINS = 1 << (31 - BIN_SHIFT)
N_STATISTICS = 14  # the kernel writes hooks.STATISTICS by index, in that order


def _span_median(values32, bits, spans, span, row, n, histogram):  # pragma: no cover - compiled
    """Return the exact median of the ``n`` in-span magnitudes of one row, as ``numpy.median`` defines it.

    A histogram of the bit patterns finds the bins of the two middle values, then only the values in
    those bins are sorted. ``histogram`` is scratch space of ``N_BINS`` counts.
    """
    width, d = bits.shape[1], bits.shape[2]
    histogram[:] = 0
    for pos in range(width):
        if spans[span, row, pos]:
            for j in range(d):
                histogram[(bits[row, pos, j] & 0x7FFFFFFF) >> BIN_SHIFT] += 1
    low_rank = (n - 1) // 2
    high_rank = n // 2
    cumulative = 0
    low_bin = -1
    high_bin = -1
    below = 0
    for b in range(N_BINS):
        if low_bin < 0 and cumulative + histogram[b] > low_rank:
            low_bin = b
            below = cumulative
        cumulative += histogram[b]
        if cumulative > high_rank:
            high_bin = b
            break
    middle = np.empty(cumulative - below, dtype=np.float32)
    filled = 0
    for pos in range(width):
        if spans[span, row, pos]:
            for j in range(d):
                b = (bits[row, pos, j] & 0x7FFFFFFF) >> BIN_SHIFT
                if b >= low_bin and b <= high_bin:
                    middle[filled] = abs(values32[row, pos, j])
                    filled += 1
    middle.sort()
    return (np.float64(middle[low_rank - below]) + np.float64(middle[high_rank - below])) / 2


def _count_massive(values32, spans, span, row, token_above, median):  # pragma: no cover - compiled
    """Count the in-span values above ``MASSIVE_MIN_ABS`` and at least ``MASSIVE_MIN_RATIO`` times the median."""
    count = 0
    threshold = MASSIVE_MIN_RATIO * median
    for pos in range(values32.shape[1]):
        if spans[span, row, pos] and token_above[pos] > 0:  # only tokens with a value above the threshold
            for j in range(values32.shape[2]):
                magnitude = np.float64(abs(values32[row, pos, j]))
                if magnitude > MASSIVE_MIN_ABS and magnitude >= threshold:
                    count += 1
    return count


def _row_statistics(values, values32, bits, spans, origin, out, nonfinite, row):  # pragma: no cover - compiled
    """Fill ``out[:, :, row]`` and ``nonfinite[:, row]`` in the layout of ``span_statistics_cpu``.

    Moments come from ``values`` (float32 or float64). Maxima, medians and
    counts come from ``values32`` and its bit patterns ``bits``, as in the tensor version.
    """
    n_spans, _, width = spans.shape
    d = values.shape[2]
    token_mean = np.empty(width)
    token_m2 = np.empty(width)
    token_m3 = np.empty(width)
    token_m4 = np.empty(width)
    token_max = np.empty(width)
    token_argmax = np.zeros(width, dtype=np.int64)
    token_above = np.zeros(width, dtype=np.int64)
    needed = np.zeros(width, dtype=np.bool_)
    for span in range(n_spans):
        for pos in range(width):
            if spans[span, row, pos]:
                needed[pos] = True

    for pos in range(width):
        if not needed[pos]:
            continue
        total = 0.0
        largest = -1.0
        largest_at = 0
        above = 0
        for j in range(d):
            total += np.float64(values[row, pos, j])
            magnitude = abs(np.float64(values32[row, pos, j]))
            if magnitude > largest:
                largest = magnitude
                largest_at = j
            if magnitude > MASSIVE_MIN_ABS:
                above += 1
        mean = total / d
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        for j in range(d):
            centred = np.float64(values[row, pos, j]) - mean
            squared = centred * centred
            m2 += squared
            m3 += squared * centred
            m4 += squared * squared
        token_mean[pos] = mean
        token_m2[pos] = m2
        token_m3[pos] = m3
        token_m4[pos] = m4
        token_max[pos] = largest
        token_argmax[pos] = largest_at
        token_above[pos] = above

    histogram = np.zeros(N_BINS, dtype=np.int64)
    for span in range(n_spans):
        tokens = 0
        finite = True
        mean_sum = 0.0
        for pos in range(width):
            if spans[span, row, pos]:
                tokens += 1
                mean_sum += token_mean[pos]
                # The float64 sum of a token's values is not finite if one of them is not, and float32
                # values cannot overflow it.
                if not math.isfinite(token_mean[pos]):
                    finite = False
        nonfinite[span, row] = not finite
        if tokens == 0 or not finite:
            for statistic in range(out.shape[1]):
                out[span, statistic, row] = np.nan
            continue

        # Span moments: per-token moments merged with the multi-group Pébay formulas.
        mean = mean_sum / tokens
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        averages = np.zeros(4)
        span_max = -1.0
        span_max_at = 0
        count_above = 0
        for pos in range(width):
            if not spans[span, row, pos]:
                continue
            delta = token_mean[pos] - mean
            delta2 = delta * delta
            m2 += token_m2[pos] + d * delta2
            m3 += token_m3[pos] + 3.0 * delta * token_m2[pos] + d * delta2 * delta
            m4 += token_m4[pos] + 4.0 * delta * token_m3[pos] + 6.0 * delta2 * token_m2[pos] + d * delta2 * delta2
            averages[0] += token_mean[pos]
            averages[1] += token_m2[pos] / d
            if token_m2[pos] > 0:
                averages[2] += math.sqrt(d) * token_m3[pos] / token_m2[pos] ** 1.5
                averages[3] += d * token_m4[pos] / token_m2[pos] ** 2 - 3.0
            else:
                averages[2] = np.nan
                averages[3] = np.nan
            if token_max[pos] > span_max:
                span_max = token_max[pos]
                span_max_at = pos
            count_above += token_above[pos]
        n = tokens * d
        # The indices below follow hooks.STATISTICS.
        out[span, 0, row] = mean
        out[span, 1, row] = m2 / n
        if m2 > 0:
            out[span, 2, row] = math.sqrt(n) * m3 / m2 ** 1.5
            out[span, 3, row] = n * m4 / m2 ** 2 - 3.0
        else:
            out[span, 2, row] = np.nan
            out[span, 3, row] = np.nan
        for k in range(4):
            out[span, 4 + k, row] = averages[k] / tokens

        median = _span_median(values32, bits, spans, span, row, n, histogram)
        count_massive = _count_massive(values32, spans, span, row, token_above, median)
        out[span, 8, row] = span_max
        out[span, 9, row] = span_max / median
        out[span, 10, row] = count_above
        out[span, 11, row] = count_massive
        out[span, 12, row] = span_max_at - origin[row]
        out[span, 13, row] = token_argmax[span_max_at]




def _all_rows(values, values32, bits, spans, origin, out, nonfinite):  # pragma: no cover - compiled
    for row in numba.prange(values.shape[0]):
        _row_kernel(values, values32, bits, spans, origin, out, nonfinite, row)


if numba is not None:
    # PyTorch's CPU operations run on GNU OpenMP threads, and Numba's OpenMP layer shares that pool.
    # Numba's default layer starts a second pool whose threads compete with PyTorch's for the same cores:
    # measured on 2 cores, the kernel then ran no faster inside a forward pass than the tensor version.
    # This preference applies to the whole process, so it is skipped when the user chose a layer.
    if "NUMBA_THREADING_LAYER" not in os.environ and "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    _span_median = numba.njit(cache=True, error_model="numpy")(_span_median)
    _count_massive = numba.njit(cache=True, error_model="numpy")(_count_massive)
    _row_kernel = numba.njit(cache=True, error_model="numpy")(_row_statistics)
    _compiled = numba.njit(parallel=True, cache=True, error_model="numpy")(_all_rows)
else:  # pragma: no cover
    _compiled = None


def available() -> bool:
    """Return True when Numba is importable, so CPU activations can use the compiled kernel."""
    return _compiled is not None


def span_statistics_cpu(
    activations: torch.Tensor, spans: torch.Tensor, origin: torch.Tensor, n_statistics: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute what ``hooks.span_statistics`` computes, for activations on the CPU, with the compiled kernel.

    Args:
        activations: (batch, pos, d) values of any floating dtype. Moments
            use them as given (float16 and bfloat16 widened to float32, which
            is exact); maxima, medians and counts use float32 magnitudes.
        spans: (span, batch, pos) boolean masks.
        origin: (batch,) positions that ``argmax_pos`` counts from.
        n_statistics: length of ``hooks.STATISTICS``, the second output dimension.

    Returns:
        ``(values, nonfinite)`` as ``hooks.span_statistics`` returns them.
    """
    if activations.device.type != "cpu":
        raise ValueError(f"The compiled statistics need activations on the CPU, not on {activations.device}; "
                         "pass compiled=False (the tensor version runs on any device).")
    if _compiled is None:
        raise RuntimeError("The compiled statistics need Numba: pip install numba, or pass compiled=False.")
    if n_statistics != N_STATISTICS:
        raise ValueError(f"The compiled kernel writes {N_STATISTICS} statistics, not {n_statistics}; update "
                         "cpu_kernel._row_statistics together with hooks.STATISTICS.")
    activations = activations.detach()
    values32 = activations.to(torch.float32).contiguous().numpy()  # exact for float16 and bfloat16
    values = activations.contiguous().numpy() if activations.dtype == torch.float64 else values32
    bits = values32.view(np.int32)
    batch, width = values.shape[:2]
    masks = spans.contiguous().numpy()
    if masks.ndim != 3 or masks.shape[1:] != (batch, width):
        raise ValueError(f"Span masks have shape {tuple(masks.shape)}; expected (span, batch={batch}, pos={width}) "
                         "to match the activations.")
    if origin.numel() not in (1, batch):
        raise ValueError(f"origin has {origin.numel()} positions; expected one per row (batch={batch}) or a single one.")
    origin = origin.to(torch.int64).reshape(-1).expand(batch).contiguous().numpy()
    n_spans = masks.shape[0]
    out = np.empty((n_spans, n_statistics, batch), dtype=np.float64)
    nonfinite = np.zeros((n_spans, batch), dtype=np.bool_)
    # Numba's OpenMP layer sets the thread count of the pool it shares with PyTorch, so match PyTorch's
    # count (a run with torch.set_num_threads(1) stays on one core) and put it back afterwards.
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        _compiled(values, values32, bits, masks, origin, out, nonfinite)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return torch.from_numpy(out), torch.from_numpy(nonfinite)
