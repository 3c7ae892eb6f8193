"""Correlation of features with utility: Spearman against scipy, BH q-values, bootstrap intervals, reliability."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from actsel.activations.table import FeatureTable
from actsel.analysis import CORRELATION_COLUMNS, correlate, max_abs_rho_summary, split_half_reliability
from actsel.analysis.correlation import _resample_counts
from actsel.utility.result import UtilityResult


def make_table(values: np.ndarray, masks=None, statistics=None, layers=None) -> FeatureTable:
    n, m = values.shape
    columns = pd.DataFrame(
        {
            "mask": masks if masks is not None else ["causal"] * m,
            "hook": ["hook_resid_post"] * m,
            "layer": layers if layers is not None else list(range(m)),
            "span": ["example"] * m,
            "statistic": statistics if statistics is not None else ["kurtosis"] * m,
        }
    )
    uids = [f"ex{i}" for i in range(n)]
    return FeatureTable(values, columns, uids, ["pos" if i % 2 else "neg" for i in range(n)], {"task": "demo"})


def make_utility(uids, value, halves=None) -> UtilityResult:
    value = np.asarray(value, dtype=float)
    if halves is None:
        halves = np.stack([value, value])
    return UtilityResult(list(uids), value, np.full(len(uids), 0.1), halves, "one_shot", "accuracy")


def hand_bh(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjustment written out step by step."""
    m = len(p_values)
    order = np.argsort(p_values)
    q = np.empty(m)
    running_min = 1.0
    for rank in range(m, 0, -1):
        index = order[rank - 1]
        running_min = min(running_min, p_values[index] * m / rank)
        q[index] = running_min
    return q


@pytest.fixture
def grid():
    rng = np.random.default_rng(0)
    n, m = 60, 8
    utility = rng.normal(size=n)
    values = rng.normal(size=(n, m)) + np.linspace(-1, 1, m) * utility[:, None]
    values[:, 3] = np.round(values[:, 3])  # ties
    values[:7, 4] = np.nan  # missing examples
    values[:, 5] = 2.5  # constant
    values[:, 6] = np.nan  # all NaN
    return make_table(values), utility


def test_columns_and_order(grid):
    table, utility = grid
    frame = correlate(table, utility, n_bootstrap=50)
    assert list(frame.columns) == list(CORRELATION_COLUMNS)
    pd.testing.assert_frame_equal(frame[list(table.columns.columns)], table.columns)


def test_rho_and_p_match_spearmanr(grid):
    table, utility = grid
    frame = correlate(table, utility, n_bootstrap=0)
    for j in [0, 1, 2, 3, 4, 7]:
        finite = np.isfinite(table.values[:, j])
        expected = stats.spearmanr(table.values[finite, j], utility[finite])
        assert frame.rho[j] == pytest.approx(expected.statistic, abs=1e-12)
        assert frame.p_value[j] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-300)
        assert frame.n[j] == finite.sum()


def test_constant_and_nan_features_counted(grid):
    table, utility = grid
    frame = correlate(table, utility, n_bootstrap=20)
    for j in (5, 6):
        assert np.isnan(frame.rho[j])
        assert np.isnan(frame.p_value[j])
        assert np.isnan(frame.q_value[j])
        assert np.isnan(frame.ci_low[j])
    assert frame.n[5] == 60
    assert frame.n[6] == 0
    assert frame.attrs["n_constant"] == 1
    assert frame.attrs["n_all_nan"] == 1
    assert frame.attrs["n_too_few"] == 0


def test_nan_utility_rows_left_out(grid):
    table, utility = grid
    utility = utility.copy()
    utility[-5:] = np.nan
    frame = correlate(table, utility, n_bootstrap=0)
    expected = stats.spearmanr(table.values[:-5, 0], utility[:-5])
    assert frame.n[0] == 55
    assert frame.rho[0] == pytest.approx(expected.statistic, abs=1e-12)


def test_q_value_equals_hand_bh(grid):
    table, utility = grid
    frame = correlate(table, utility, n_bootstrap=0)
    tested = frame.p_value.notna().to_numpy()
    assert tested.sum() == 6
    np.testing.assert_allclose(frame.q_value[tested], hand_bh(frame.p_value[tested].to_numpy()), rtol=1e-12)


def test_q_value_small_hand_case():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # Sorted: 0.01 (1), 0.03 (2), 0.04 (3), 0.5 (4); p * 4 / rank = 0.04, 0.06, 0.0533, 0.5;
    # cumulative minimum from the largest rank down: 0.04, 0.0533, 0.0533, 0.5.
    expected = np.array([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    np.testing.assert_allclose(hand_bh(p), expected, rtol=1e-12)
    np.testing.assert_allclose(stats.false_discovery_control(p, method="bh"), expected, rtol=1e-12)


def test_bootstrap_matches_resampled_spearmanr():
    rng = np.random.default_rng(3)
    n, n_bootstrap = 30, 200
    utility = np.round(rng.normal(size=n), 1)
    values = np.column_stack([utility + rng.normal(size=n), np.arange(n) % 4, np.round(rng.normal(size=n), 1)])
    table = make_table(values)
    frame = correlate(table, utility, n_bootstrap=n_bootstrap, ci=0.9, seed=7)

    counts = _resample_counts(n, n_bootstrap, seed=7).astype(int)
    for j in range(values.shape[1]):
        reference = np.array(
            [stats.spearmanr(np.repeat(values[:, j], c), np.repeat(utility, c)).statistic for c in counts]
        )
        low, high = np.nanquantile(reference, [0.05, 0.95])
        assert frame.ci_low[j] == pytest.approx(low, abs=1e-12)
        assert frame.ci_high[j] == pytest.approx(high, abs=1e-12)


def test_ci_contains_rho_and_narrows_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 400):
        utility = rng.normal(size=n)
        values = (utility + rng.normal(size=n))[:, None]
        frame = correlate(make_table(values), utility, n_bootstrap=500, seed=0)
        assert frame.ci_low[0] < frame.rho[0] < frame.ci_high[0]
        widths.append(frame.ci_high[0] - frame.ci_low[0])
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_seeded(grid):
    table, utility = grid
    first = correlate(table, utility, n_bootstrap=100, seed=1)
    again = correlate(table, utility, n_bootstrap=100, seed=1)
    other = correlate(table, utility, n_bootstrap=100, seed=2)
    np.testing.assert_array_equal(first.ci_low, again.ci_low)
    assert not np.allclose(first.ci_low[[0, 1, 2]], other.ci_low[[0, 1, 2]])


def test_utility_result_aligned_by_uid(grid):
    table, utility = grid
    order = np.random.default_rng(0).permutation(len(utility))[:50]  # shuffled, 10 rows missing
    result = make_utility([table.uids[i] for i in order] + ["other"], np.append(utility[order], 9.0))
    frame = correlate(table, result, n_bootstrap=0)
    kept = np.sort(order)
    expected = stats.spearmanr(table.values[kept, 0], utility[kept])
    assert frame.rho[0] == pytest.approx(expected.statistic, abs=1e-12)
    assert frame.n[0] == 50
    assert frame.attrs["utility_estimator"] == "one_shot"
    assert frame.attrs["reliability"]["n"] == 50


def test_correlate_rejects_bad_input(grid):
    table, utility = grid
    with pytest.raises(ValueError, match="shape"):
        correlate(table, utility[:-1])
    with pytest.raises(ValueError, match="ci"):
        correlate(table, utility, ci=95)
    with pytest.raises(ValueError, match="n_bootstrap"):
        correlate(table, utility, n_bootstrap=-1)
    with pytest.raises(ValueError, match="No uid"):
        correlate(table, make_utility(["a", "b", "c"], [1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="FeatureTable"):
        correlate(table.values, utility)


def test_constant_utility_gives_nan(grid, caplog):
    table, _ = grid
    with caplog.at_level(logging.WARNING):
        frame = correlate(table, np.ones(table.n_examples), n_bootstrap=10)
    assert frame.rho.isna().all()
    assert "same for every example" in caplog.text


def test_summary_picks_max_abs_rho():
    rng = np.random.default_rng(2)
    n = 80
    utility = rng.normal(size=n)
    values = np.column_stack(
        [utility + 3 * rng.normal(size=n), -utility + 0.3 * rng.normal(size=n), rng.normal(size=n), np.ones(n)]
    )
    table = make_table(values, masks=["causal", "causal", "isolated", "sink_free"], layers=[0, 1, 0, 0])
    frame = correlate(table, make_utility(table.uids, utility), n_bootstrap=50)
    summary = max_abs_rho_summary(frame).set_index("mask")

    assert list(summary.index) == ["causal", "isolated", "sink_free"]
    assert summary.loc["causal", "layer"] == 1
    assert summary.loc["causal", "rho"] == pytest.approx(frame.rho[1])
    assert summary.loc["causal", "rho"] < -0.9
    assert summary.loc["causal", "max_abs_rho"] == pytest.approx(abs(frame.rho[1]))
    assert summary.loc["causal", "q_value"] == pytest.approx(frame.q_value[1])
    assert summary.loc["causal", "n_features"] == 2
    assert summary.loc["causal", "n_significant"] == 2
    assert np.isnan(summary.loc["sink_free", "max_abs_rho"])
    assert summary.loc["sink_free", "n_nan"] == 1
    # Halves equal to the value: reliability 1 and ceiling 1.
    assert summary.loc["causal", "reliability"] == pytest.approx(1.0)
    assert summary.loc["causal", "ceiling"] == pytest.approx(1.0)


def test_summary_by_task_and_unknown_column():
    rng = np.random.default_rng(4)
    utility = rng.normal(size=30)
    frames = []
    for task, sign in (("sst2", 1), ("trec", -1)):
        frame = correlate(make_table(np.column_stack([sign * utility, rng.normal(size=30)])), utility, n_bootstrap=0)
        frames.append(frame.assign(task=task))
    summary = max_abs_rho_summary(pd.concat(frames), by=("task", "mask"))
    assert list(summary.task) == ["sst2", "trec"]
    assert list(summary.rho) == pytest.approx([1.0, -1.0])
    assert summary.reliability.isna().all()
    with pytest.raises(ValueError, match="no column"):
        max_abs_rho_summary(frames[0], by=("model",))


@pytest.mark.parametrize("r_true", [0.3, 0.6, 0.9])
def test_reliability_known_correlation(r_true):
    # Two halves = signal + independent noise; corr(halves) = 1 / (1 + noise variance).
    rng = np.random.default_rng(5)
    n = 20_000
    signal = rng.normal(size=n)
    noise_sd = np.sqrt(1.0 / r_true - 1.0)
    halves = np.stack([signal + noise_sd * rng.normal(size=n), signal + noise_sd * rng.normal(size=n)])

    pearson = split_half_reliability(halves, method="pearson")
    assert pearson["r_half"] == pytest.approx(r_true, abs=0.02)
    assert pearson["spearman_brown"] == pytest.approx(2 * r_true / (1 + r_true), abs=0.02)
    assert pearson["ceiling"] == pytest.approx(np.sqrt(pearson["spearman_brown"]), rel=1e-12)
    assert pearson["n"] == n

    # For bivariate normal data Spearman's rho is (6 / pi) asin(r / 2).
    spearman = split_half_reliability(make_utility([str(i) for i in range(n)], halves.mean(0), halves))
    assert spearman["r_half"] == pytest.approx(6 / np.pi * np.arcsin(r_true / 2), abs=0.02)
    r = spearman["r_half"]
    assert spearman["spearman_brown"] == pytest.approx(2 * r / (1 + r), rel=1e-12)


def test_reliability_edge_cases():
    rng = np.random.default_rng(6)
    a = rng.normal(size=50)
    anti = split_half_reliability(np.stack([a, -a + 0.1 * rng.normal(size=50)]))
    assert anti["r_half"] < -0.9
    assert anti["spearman_brown"] < 0
    assert anti["ceiling"] == 0.0

    constant = split_half_reliability(np.stack([np.ones(50), a]))
    assert np.isnan(constant["r_half"])
    assert np.isnan(constant["ceiling"])

    with_nan = np.stack([a, a])
    with_nan[0, :10] = np.nan
    assert split_half_reliability(with_nan)["n"] == 40
    assert split_half_reliability(with_nan)["r_half"] == pytest.approx(1.0)

    with pytest.raises(ValueError, match="method"):
        split_half_reliability(with_nan, method="kendall")
    with pytest.raises(ValueError, match="shape"):
        split_half_reliability(np.ones((3, 5)))
