"""The Numba kernel for CPU activations against the tensor version of span_statistics and against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from actsel.activations import cpu_kernel
from actsel.activations.hooks import STATISTICS, span_statistics

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="numba is not installed")


def _batch(seed: int, shape: tuple[int, int, int]):
    """Heavy-tailed activations with a massive value, four overlapping spans of different lengths, and an empty one."""
    rng = np.random.default_rng(seed)
    batch, width, d = shape
    values = torch.from_numpy(rng.standard_t(3, size=shape) * rng.uniform(0.1, 3.0, size=(batch, width, 1)) + 0.3)
    values = values.float()
    values[:, 0, d // 2] = 2.2e4
    values[0, 2, min(1, d - 1)] = -350.0
    lengths = torch.from_numpy(rng.integers(3, width + 1, size=batch))
    pos = torch.arange(width)
    example = (pos[None] < lengths[:, None]) & (pos[None] >= 1)
    label = example & (pos[None] >= lengths[:, None] - 2)
    last = pos[None] == lengths[:, None] - 1
    with_sink = pos[None] < lengths[:, None]
    empty = torch.zeros(batch, width, dtype=torch.bool)
    return values, [example, example & ~label, label, last, with_sink, empty], torch.ones(batch, dtype=torch.long)


@pytest.mark.parametrize("shape", [(16, 40, 576), (5, 9, 7), (3, 4, 1), (2, 3, 1501)])
def test_kernel_equals_tensor_version(shape):
    values, spans, origin = _batch(sum(shape), shape)
    compiled, compiled_flags = span_statistics(values, spans, origin, compiled=True)
    reference, reference_flags = span_statistics(values, spans, origin, compiled=False)
    assert torch.equal(compiled_flags, reference_flags)
    assert torch.equal(compiled.isnan(), reference.isnan())
    for index, name in enumerate(STATISTICS):
        # Sums run in a different order, so moments agree to float64 rounding; everything else is exact.
        rtol = 1e-9 if index < 8 else 0.0
        torch.testing.assert_close(compiled[:, index], reference[:, index], rtol=rtol, atol=0.0, equal_nan=True,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_kernel_medians_and_counts_match_numpy():
    values, spans, origin = _batch(7, (6, 12, 33))
    values[2, 3, :10] = values[2, 3, 10]  # ties around the middle
    result, _ = span_statistics(values, spans, origin, compiled=True)
    for span_index, span in enumerate(spans[:5]):
        for row in range(values.shape[0]):
            magnitude = values[row][span[row]].abs().double().numpy()
            if magnitude.size == 0:
                assert torch.isnan(result[span_index, :, row]).all()
                continue
            got = dict(zip(STATISTICS, result[span_index, :, row].numpy()))
            median = np.median(magnitude)
            np.testing.assert_allclose(got["max_over_median"], magnitude.max() / median, rtol=1e-12)
            assert got["count_above_100"] == (magnitude > 100).sum()
            assert got["count_massive"] == ((magnitude > 100) & (magnitude >= 1000 * median)).sum()


def test_kernel_flags_nonfinite_tokens_only_in_their_spans():
    values, spans, origin = _batch(3, (4, 10, 16))
    values[1, 1, 2] = float("nan")  # position 1 is in the example span of every row
    values[2, 2, 0] = float("-inf")
    result, nonfinite = span_statistics(values, spans, origin, compiled=True)
    reference, reference_flags = span_statistics(values, spans, origin, compiled=False)
    assert torch.equal(nonfinite, reference_flags)
    assert nonfinite[:, 1].any()
    assert nonfinite[:, 2].any()
    assert not nonfinite[:, 0].any()
    assert not nonfinite[:, 3].any()
    assert torch.isnan(result[nonfinite[:, None, :].expand_as(result)]).all()
    assert torch.equal(result.isnan(), reference.isnan())


def test_kernel_writes_every_statistic():
    assert cpu_kernel.N_STATISTICS == len(STATISTICS)


def test_kernel_rejects_other_devices():
    values = torch.randn(1, 2, 3, device="meta")
    with pytest.raises(ValueError, match="compiled=False"):
        cpu_kernel.span_statistics_cpu(values, torch.ones(1, 1, 2, dtype=torch.bool), torch.zeros(1), len(STATISTICS))


def test_float64_activations_keep_float64_moments():
    """float64 input is not rounded to float32 for the moments (maxima and medians use float32 in both versions)."""
    values, spans, origin = _batch(13, (3, 6, 64))
    values = values.double() * 3 + 0.1
    values[0, 1, 0] = 1e39  # beyond float32: infinite as a magnitude, finite for the moments
    compiled, flags = span_statistics(values, spans, origin, compiled=True)
    reference, reference_flags = span_statistics(values, spans, origin, compiled=False)
    assert torch.equal(flags, reference_flags)
    assert not flags[0, 0]
    torch.testing.assert_close(compiled[:, :8], reference[:, :8], rtol=1e-9, atol=0.0, equal_nan=True)
    torch.testing.assert_close(compiled[:, 8:], reference[:, 8:], rtol=0.0, atol=0.0, equal_nan=True)
    span = values[1][spans[0][1]].numpy().ravel()
    np.testing.assert_allclose(compiled[0, 2, 1].item(), stats.skew(span), rtol=1e-12)
    assert torch.isinf(compiled[0, 8, 0])  # max_abs of the row holding 1e39


def test_kernel_rejects_mismatched_shapes():
    values = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="expected \\(span, batch=2, pos=4\\)"):
        span_statistics(values, [torch.ones(2, 6, dtype=torch.bool)], torch.zeros(2, dtype=torch.long), compiled=True)
    with pytest.raises(ValueError, match="origin has 3 positions"):
        span_statistics(values, [torch.ones(2, 4, dtype=torch.bool)], torch.zeros(3, dtype=torch.long), compiled=True)


def test_scalar_origin_and_noncontiguous_masks():
    values, spans, _ = _batch(17, (3, 40, 64))
    transposed = [span.T.contiguous().T for span in spans]  # same values, column-major strides
    assert not transposed[0].is_contiguous()
    for compiled in (False, True):
        got, _ = span_statistics(values, transposed, torch.tensor(1), compiled=compiled)
        expected, _ = span_statistics(values, spans, torch.ones(3, dtype=torch.long), compiled=compiled)
        torch.testing.assert_close(got, expected, rtol=0.0, atol=0.0, equal_nan=True)


def test_kernel_leaves_torch_thread_count_alone():
    values, spans, origin = _batch(19, (4, 8, 32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)  # more than Numba's pool may have
        span_statistics(values, spans, origin, compiled=True)
        assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)


def test_kernel_follows_torch_thread_count():
    values, spans, origin = _batch(11, (4, 8, 32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = span_statistics(values, spans, origin, compiled=True)
        assert cpu_kernel.numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    parallel, _ = span_statistics(values, spans, origin, compiled=True)
    torch.testing.assert_close(single, parallel, rtol=0, atol=0, equal_nan=True)
