"""Mergeable moments and span statistics against scipy.stats and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from actsel.activations.hooks import STATISTICS, span_statistics
from actsel.activations.median import span_median
from actsel.activations.moments import Moments, combine_tokens, token_moments

RTOL = 1e-6


def _heavy_tailed(rng, shape):
    """Student-t values with a shifted mean, like activations with outliers."""
    return rng.standard_t(3, size=shape) * 2.0 + 0.7


def _scipy_moments(values):
    values = np.ravel(values)
    return {
        "mean": values.mean(),
        "variance": stats.moment(values, 2),
        "skewness": stats.skew(values),
        "kurtosis": stats.kurtosis(values, fisher=True),
    }


def _assert_matches(moments: Moments, values):
    expected = _scipy_moments(values)
    np.testing.assert_allclose(moments.mean, expected["mean"], rtol=RTOL)
    np.testing.assert_allclose(moments.variance, expected["variance"], rtol=RTOL)
    np.testing.assert_allclose(moments.skewness, expected["skewness"], rtol=RTOL)
    np.testing.assert_allclose(moments.kurtosis, expected["kurtosis"], rtol=RTOL)


def test_moments_match_scipy():
    values = _heavy_tailed(np.random.default_rng(0), 5000)
    _assert_matches(Moments.from_values(values), values)
    np.testing.assert_allclose(Moments.from_values(values).m3 / 5000, stats.moment(values, 3), rtol=RTOL)


def test_merge_two_shards_equals_one_pass():
    rng = np.random.default_rng(1)
    values = _heavy_tailed(rng, 3001)
    values[17] = 2.2e4  # one massive value, as on SmolLM2
    left, right = values[:1200], values[1200:]
    merged = Moments.from_values(left).merge(Moments.from_values(right))
    _assert_matches(merged, values)
    one_pass = Moments.from_values(values)
    for name in ("n", "mean", "m2", "m3", "m4"):
        np.testing.assert_allclose(getattr(merged, name), getattr(one_pass, name), rtol=1e-10)


def test_merge_many_batches_and_empty():
    rng = np.random.default_rng(2)
    batches = [_heavy_tailed(rng, size) for size in (1, 7, 300, 2, 950)]
    total = Moments.from_values(batches[0])
    for batch in batches[1:]:
        total = total.merge(Moments.from_values(batch))
    _assert_matches(total, np.concatenate(batches))
    empty = Moments(np.zeros(()), np.full((), np.nan), np.zeros(()), np.zeros(()), np.zeros(()))
    for merged in (total.merge(empty), empty.merge(total)):
        for name in ("n", "mean", "m2", "m3", "m4"):
            np.testing.assert_allclose(getattr(merged, name), getattr(total, name), rtol=1e-12)


def test_merge_is_vectorised_over_groups():
    rng = np.random.default_rng(3)
    values = _heavy_tailed(rng, (4, 100))
    merged = Moments.from_values(values[:, :30], axis=1).merge(Moments.from_values(values[:, 30:], axis=1))
    for row in range(4):
        _assert_matches(merged[row], values[row])


def test_constant_sample_gives_nan_shape_statistics():
    moments = Moments.from_values(np.full(10, 3.0))
    assert moments.variance == 0.0
    assert np.isnan(moments.skewness)
    assert np.isnan(moments.kurtosis)


def test_combine_tokens_matches_scipy_over_span():
    rng = np.random.default_rng(4)
    values = torch.from_numpy(_heavy_tailed(rng, (3, 9, 16))).float()
    in_span = torch.zeros(3, 9, dtype=torch.bool)
    in_span[0, 2:7] = True
    in_span[1, 0:9] = True
    in_span[2, 8] = True
    values[0, 0, 0] = float("inf")  # outside the span: must not leak into it
    n, mean, m2, m3, m4 = combine_tokens(token_moments(values), in_span, 16)
    for row in range(3):
        expected = values[row][in_span[row]].double().numpy()
        moments = Moments(n[row].numpy(), mean[row].numpy(), m2[row].numpy(), m3[row].numpy(), m4[row].numpy())
        assert moments.n == expected.size
        _assert_matches(moments, expected)


@pytest.mark.parametrize("compiled", [False, True], ids=["tensor", "numba"])
def test_span_statistics_match_numpy(compiled):
    rng = np.random.default_rng(5)
    values = torch.from_numpy(_heavy_tailed(rng, (2, 8, 12))).float()
    values[0, 3, 5] = -2500.0  # massive: above 100 and above 1000x the median
    values[0, 4, 1] = 150.0  # above 100 but not 1000x the median
    in_span = torch.zeros(2, 8, dtype=torch.bool)
    in_span[0, 1:7] = True  # 6 tokens: even count of values
    in_span[1, 2:5] = True
    origin = torch.tensor([1, 2])
    result, nonfinite = span_statistics(values, [in_span], origin, compiled=compiled)
    assert result.shape == (1, len(STATISTICS), 2)
    assert not nonfinite.any()
    for row in range(2):
        span = values[row][in_span[row]].double().numpy()  # (tokens, d)
        got = dict(zip(STATISTICS, result[0, :, row].numpy()))
        expected = _scipy_moments(span)
        for name in ("mean", "variance", "skewness", "kurtosis"):
            np.testing.assert_allclose(got[name], expected[name], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(got["token_mean"], span.mean(1).mean(), rtol=RTOL)
        np.testing.assert_allclose(got["token_variance"], span.var(1).mean(), rtol=RTOL)
        np.testing.assert_allclose(got["token_skewness"], stats.skew(span, axis=1).mean(), rtol=RTOL)
        np.testing.assert_allclose(got["token_kurtosis"], stats.kurtosis(span, axis=1).mean(), rtol=RTOL)
        magnitude = np.abs(span)
        median = np.median(magnitude)
        np.testing.assert_allclose(got["max_abs"], magnitude.max(), rtol=RTOL)
        np.testing.assert_allclose(got["max_over_median"], magnitude.max() / median, rtol=RTOL)
        assert got["count_above_100"] == (magnitude > 100).sum()
        assert got["count_massive"] == ((magnitude > 100) & (magnitude >= 1000 * median)).sum()
        token, dim = np.unravel_index(magnitude.argmax(), magnitude.shape)
        first = int(torch.nonzero(in_span[row])[0])
        assert got["argmax_pos"] == token + first - int(origin[row])
        assert got["argmax_dim"] == dim
    counts = dict(zip(STATISTICS, result[0, :, 0].numpy()))
    assert counts["count_above_100"] == 2
    assert counts["count_massive"] == 1
    assert counts["argmax_pos"] == 2
    assert counts["argmax_dim"] == 5


@pytest.mark.parametrize("d", [1, 5, 6, 1501])  # up to 9 x 6 values: direct selection; 9 x 1501: histogram
def test_span_median_odd_even_empty(d):
    rng = np.random.default_rng(d)
    magnitude = torch.from_numpy(np.abs(_heavy_tailed(rng, (6, 9, d)))).float()
    in_span = torch.from_numpy(rng.random((6, 9)) > 0.5)
    in_span[0] = False  # empty span
    in_span[1] = False
    in_span[1, 4] = True  # a single token: d values, odd or even
    in_span[2] = True  # every token
    magnitude[3, :, : d // 2] = magnitude[3, 0, 0]  # ties around the middle
    bits = magnitude.view(torch.int32)
    got = span_median(bits, in_span).numpy()
    assert np.isnan(got[0])
    for row in range(1, 6):
        expected = np.median(magnitude[row][in_span[row]].double().numpy())
        np.testing.assert_allclose(got[row], expected, rtol=1e-12, err_msg=f"row {row}")


@pytest.mark.parametrize("compiled", [False, True], ids=["tensor", "numba"])
def test_span_statistics_flag_nonfinite_and_empty(compiled):
    values = torch.randn(2, 5, 4)
    values[1, 2, 3] = float("inf")
    in_span = torch.ones(2, 5, dtype=torch.bool)
    empty = torch.zeros(2, 5, dtype=torch.bool)
    result, nonfinite = span_statistics(values, [in_span, empty], torch.zeros(2, dtype=torch.long), compiled=compiled)
    assert nonfinite[0].tolist() == [False, True]
    assert np.isfinite(result[0, :, 0].numpy()).all()
    assert np.isnan(result[0, :, 1].numpy()).all()
    assert np.isnan(result[1].numpy()).all()


@pytest.mark.parametrize("compiled", [False, True], ids=["tensor", "numba"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_span_statistics_float64_for_half_inputs(dtype, compiled):
    """2.2e4 squared overflows float16, so statistics must be computed in float64."""
    values = torch.randn(1, 4, 8).to(dtype)
    values[0, 0, 3] = 2.2e4
    in_span = torch.ones(1, 4, dtype=torch.bool)
    result, nonfinite = span_statistics(values, [in_span], torch.zeros(1, dtype=torch.long), compiled=compiled)
    assert result.dtype == torch.float64
    assert not nonfinite.any()
    expected = _scipy_moments(values.double().numpy())
    got = dict(zip(STATISTICS, result[0, :, 0].numpy()))
    np.testing.assert_allclose(got["kurtosis"], expected["kurtosis"], rtol=RTOL)
    np.testing.assert_allclose(got["variance"], expected["variance"], rtol=RTOL)
