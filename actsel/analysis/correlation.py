"""Spearman correlation between every feature of a ``FeatureTable`` and example utility.

``correlate`` returns one row per feature (mask, hook, layer, span, statistic)
with Spearman's rho, its two-sided p-value, a percentile bootstrap confidence
interval, the Benjamini-Hochberg q-value over the whole grid and the number of
examples used. ``max_abs_rho_summary`` reduces that grid to the largest
``|rho|`` per group, next to the split-half reliability of the utility (see
``actsel.analysis.reliability``), which bounds how large ``|rho|`` can be.

The bootstrap is vectorised: features that are finite on the same examples
form one group, and each group shares one set of resamples. A resample is
stored as the number of times each example was drawn. Each column is sorted
once, and the ranks that ``scipy.stats.rankdata`` would give the resampled
column follow from cumulative draw counts in that order, so no resample is
sorted again.
Work runs in blocks of resamples x features of bounded size.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from actsel.activations.table import FEATURE_KEYS, FeatureTable
from actsel.analysis.reliability import split_half_reliability
from actsel.utility.result import UtilityResult

logger = logging.getLogger(__name__)

CORRELATION_COLUMNS = (*FEATURE_KEYS, "rho", "ci_low", "ci_high", "p_value", "q_value", "n")

# Fewer finite examples than this give rho = NaN; with 2 points rho is always +-1.
MIN_EXAMPLES = 3

# Upper bound on the float64 elements of one bootstrap block (resamples x features x examples),
# about 32 MB; a block needs about six arrays of that size while it runs.
_BLOCK_ELEMENTS = 4_000_000


def correlate(
    features: FeatureTable,
    utility: UtilityResult | np.ndarray | Sequence[float],
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Correlate every feature column with utility (Spearman, bootstrap CI, BH q-values).

    Args:
        features: table of shape (n_examples, n_features).
        utility: a ``UtilityResult`` (rows matched to ``features.uids`` by uid;
            examples without utility are dropped with a warning), or an array of
            shape (n_examples,) in the row order of ``features``.
        n_bootstrap: percentile-bootstrap resamples of the examples; 0 skips the
            bootstrap and leaves the interval NaN.
        ci: coverage of the interval, in (0, 1).
        seed: seed of the resampling; all features finite on the same examples
            share the same resamples.
        progress: show a progress bar over bootstrap blocks.

    Returns:
        DataFrame with one row per feature, in the order of ``features.columns``,
        and the columns ``CORRELATION_COLUMNS``. ``n`` counts the examples where
        both the feature and the utility are finite. ``rho``, the interval and
        the p-value are NaN for a feature that is constant or has fewer than
        ``MIN_EXAMPLES`` finite examples. Its q-value is NaN too, and the
        other p-values are adjusted together. ``attrs`` stores the settings,
        the counts ``n_constant``, ``n_all_nan`` and ``n_too_few``, and the
        split-half ``reliability`` of a ``UtilityResult``.

    Raises:
        TypeError: if ``features`` is not a ``FeatureTable``.
        ValueError: for invalid settings, an array of the wrong length, or no
            uid shared by the features and the utility.
    """
    if not isinstance(features, FeatureTable):
        raise TypeError(f"features must be a FeatureTable, got {type(features).__name__}.")
    if not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be an integer >= 0, got {n_bootstrap!r}.")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), for example 0.95; got {ci!r}.")

    features, y, reliability, utility_meta = _align(features, utility)
    x = features.values
    n_features = x.shape[1]

    rho = np.full(n_features, np.nan)
    p_value = np.full(n_features, np.nan)
    ci_low = np.full(n_features, np.nan)
    ci_high = np.full(n_features, np.nan)

    finite_y = y[np.isfinite(y)]
    if finite_y.size and np.ptp(finite_y) == 0:
        logger.warning("The utility is the same for every example (%g); every rho is NaN.", finite_y[0])
    finite = np.isfinite(x) & np.isfinite(y)[:, None]  # (n_examples, n_features)
    n_finite = finite.sum(axis=0)

    # Columns finite on the same examples are ranked and resampled together.
    patterns, group_of = np.unique(finite.T, axis=0, return_inverse=True)
    group_of = np.asarray(group_of).reshape(-1)
    groups = []
    for group, pattern in enumerate(patterns):
        if pattern.sum() < MIN_EXAMPLES:
            continue
        cols = np.flatnonzero(group_of == group)
        rows = np.flatnonzero(pattern)
        rho[cols], p_value[cols] = _spearman_columns(x[np.ix_(rows, cols)], y[rows])
        defined = cols[np.isfinite(rho[cols])]
        if n_bootstrap > 0 and len(defined):
            groups.append((rows, defined))

    alpha = 1.0 - ci
    n_bootstrapped = sum(len(cols) for _, cols in groups)
    with tqdm(total=n_bootstrapped, desc="bootstrap", unit="feature", disable=not progress) as bar:
        for rows, cols in groups:
            boot = _bootstrap_rho(x[np.ix_(rows, cols)], y[rows], n_bootstrap, seed, bar)
            ci_low[cols], ci_high[cols] = _percentile_interval(boot, alpha)

    q_value = np.full(n_features, np.nan)
    tested = np.isfinite(p_value)
    if tested.any():
        q_value[tested] = stats.false_discovery_control(p_value[tested], method="bh")

    n_all_nan = int((n_finite == 0).sum())
    n_too_few = int(((n_finite > 0) & (n_finite < MIN_EXAMPLES)).sum())
    n_constant = int(((n_finite >= MIN_EXAMPLES) & ~np.isfinite(rho)).sum())
    if n_all_nan or n_too_few or n_constant:
        logger.info(
            "rho is NaN for %d of %d features: %d constant, %d with no finite value, %d with fewer than %d finite examples.",
            n_all_nan + n_too_few + n_constant, n_features, n_constant, n_all_nan, n_too_few, MIN_EXAMPLES,
        )

    frame = features.columns.copy()
    frame["rho"] = rho
    frame["ci_low"] = ci_low
    frame["ci_high"] = ci_high
    frame["p_value"] = p_value
    frame["q_value"] = q_value
    frame["n"] = n_finite.astype(int)
    frame.attrs.update(
        n_bootstrap=int(n_bootstrap),
        ci=float(ci),
        seed=int(seed),
        n_examples=int(len(y)),
        n_constant=n_constant,
        n_all_nan=n_all_nan,
        n_too_few=n_too_few,
        reliability=reliability,
        task=features.metadata.get("task"),
        model=features.metadata.get("model"),
        **utility_meta,
    )
    return frame


def _align(features: FeatureTable, utility) -> tuple[FeatureTable, np.ndarray, dict | None, dict]:
    """Return the feature rows that have a utility, the utility in that order, its reliability and names."""
    if isinstance(utility, UtilityResult):
        have = set(utility.uids)
        common = [uid for uid in features.uids if uid in have]
        if not common:
            raise ValueError(
                f"No uid is shared by the features ({features.uids[:3]}...) and the utility "
                f"({utility.uids[:3]}...); were they computed on the same candidate pool?"
            )
        if len(common) < features.n_examples:
            logger.warning(
                "%d of %d examples have no utility and are left out of the correlation.",
                features.n_examples - len(common), features.n_examples,
            )
            features = features.take(common)
        aligned = utility.take(common)
        names = {"utility_estimator": aligned.estimator, "utility_metric": aligned.metric}
        return features, aligned.value, split_half_reliability(aligned), names

    y = np.asarray(utility, dtype=np.float64)
    if y.shape != (features.n_examples,):
        raise ValueError(
            f"utility array has shape {y.shape} but the features have {features.n_examples} rows; "
            "pass an array of shape (n_examples,) in the order of features.uids, or a UtilityResult."
        )
    return features, y, None, {"utility_estimator": None, "utility_metric": None}


def _spearman_columns(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rho and two-sided p-value of each column of finite ``x`` (n, m) against finite ``y`` (n,).

    The p-value uses the t approximation with n - 2 degrees of freedom, as
    ``scipy.stats.spearmanr`` does. Constant columns get NaN.
    """
    n = x.shape[0]
    rho = _rank_correlation(stats.rankdata(x, axis=0).T, stats.rankdata(y)[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rho * np.sqrt((n - 2) / ((1.0 + rho) * (1.0 - rho))).clip(0)
    p_value = 2.0 * stats.t.sf(np.abs(t), n - 2)
    return rho, p_value


def _rank_correlation(x_ranks: np.ndarray, y_ranks: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis of ranks; broadcasts ``y_ranks`` over ``x_ranks``.

    Returns NaN where either side is constant.
    """
    xc = x_ranks - x_ranks.mean(axis=-1, keepdims=True)
    yc = y_ranks - y_ranks.mean(axis=-1, keepdims=True)
    numerator = (xc * yc).sum(axis=-1)
    denominator = np.sqrt((xc * xc).sum(axis=-1) * (yc * yc).sum(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(denominator > 0, numerator / denominator, np.nan)
    return np.clip(rho, -1.0, 1.0)


def _block_sizes(n_rows: int, n_cols: int, n_bootstrap: int) -> tuple[int, int]:
    """Resamples and features per block, so that one block stays under ``_BLOCK_ELEMENTS`` where it can."""
    columns = max(1, min(n_cols, _BLOCK_ELEMENTS // n_rows))
    resamples = max(1, min(n_bootstrap, _BLOCK_ELEMENTS // (columns * n_rows)))
    return resamples, columns


def _resample_counts(n_rows: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """Draw bootstrap resamples as counts per example, shape (n_bootstrap, n_rows), each row summing to ``n_rows``."""
    draws = np.random.default_rng(seed).integers(0, n_rows, size=(n_bootstrap, n_rows))
    flat = (draws + n_rows * np.arange(n_bootstrap)[:, None]).ravel()
    return np.bincount(flat, minlength=n_bootstrap * n_rows).reshape(n_bootstrap, n_rows).astype(np.float64)


def _tie_bounds(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and one-past-last sorted position of each element's tie group, along axis 0."""
    n = sorted_values.shape[0]
    positions = np.arange(n).reshape((n,) + (1,) * (sorted_values.ndim - 1))
    differs = sorted_values[1:] != sorted_values[:-1]
    starts_group = np.concatenate([np.ones_like(differs[:1]), differs])
    ends_group = np.concatenate([differs, np.ones_like(differs[:1])])
    start = np.maximum.accumulate(np.where(starts_group, positions, 0), axis=0)
    end = np.minimum.accumulate(np.where(ends_group, positions, n)[::-1], axis=0)[::-1] + 1
    return start, end


def _resampled_ranks(counts_sorted: np.ndarray, start: np.ndarray | None, end: np.ndarray | None) -> np.ndarray:
    """Average rank each example would get in the resample, from its multiplicities in sorted order.

    In a resample where example i appears ``counts[i]`` times, a value has rank
    (resampled values below it) + (resampled values equal to it + 1) / 2. This
    is what ``scipy.stats.rankdata`` returns on the resampled column, and it
    needs no sort per resample. Shapes: ``counts_sorted`` (..., n); ``start`` and
    ``end`` (from ``_tie_bounds``) broadcast to it, or are None when the column
    has no ties.
    """
    cumulative = np.cumsum(counts_sorted, axis=-1)
    if start is None:
        # Without ties each group is one example: below = cumulative - counts, equal = counts.
        return cumulative - (counts_sorted - 1.0) / 2.0
    padded = np.zeros(counts_sorted.shape[:-1] + (counts_sorted.shape[-1] + 1,))
    padded[..., 1:] = cumulative
    below = np.take_along_axis(padded, np.broadcast_to(start, counts_sorted.shape), axis=-1)
    upto = np.take_along_axis(padded, np.broadcast_to(end, counts_sorted.shape), axis=-1)
    return below + (upto - below + 1.0) / 2.0


def _bootstrap_rho(x: np.ndarray, y: np.ndarray, n_bootstrap: int, seed: int, bar) -> np.ndarray:
    """Spearman rho of each column of ``x`` (n, m) with ``y`` on ``n_bootstrap`` resamples, shape (n_bootstrap, m).

    A resample is stored as example multiplicities, and rho is the Pearson
    correlation of the resampled ranks weighted by them. The ranks are those
    ``scipy.stats.rankdata`` gives the resampled columns (average ranks for
    ties), and their weighted mean is always (n + 1) / 2.
    """
    n_rows, n_cols = x.shape
    counts = _resample_counts(n_rows, n_bootstrap, seed)  # (b, n)
    centre = (n_rows + 1) / 2.0

    y_order = np.argsort(y, kind="stable")
    y_start, y_end = _tie_bounds(y[y_order])
    y_ranks = np.empty_like(counts)
    y_ranks[:, y_order] = _resampled_ranks(counts[:, y_order], y_start, y_end) - centre  # (b, n), original order
    y_ss = (counts * y_ranks**2).sum(axis=-1)  # (b,)

    x_order = np.argsort(x, axis=0, kind="stable").T  # (m, n)
    x_start, x_end = _tie_bounds(np.take_along_axis(x, x_order.T, axis=0))
    x_start, x_end = x_start.T, x_end.T  # (m, n)
    tied = (x_end - x_start > 1).any(axis=1)  # (m,)

    boot = np.empty((n_bootstrap, n_cols))
    for subset in (np.flatnonzero(~tied), np.flatnonzero(tied)):
        resamples, columns = _block_sizes(n_rows, len(subset), n_bootstrap)
        for first in range(0, len(subset), columns):
            cols = subset[first : first + columns]
            order = x_order[cols]  # (m_block, n)
            start, end = (x_start[cols][None], x_end[cols][None]) if tied[cols[0]] else (None, None)
            for begin in range(0, n_bootstrap, resamples):
                weight = counts[begin : begin + resamples][:, order]  # (b_block, m_block, n), x-sorted order
                x_ranks = _resampled_ranks(weight, start, end) - centre
                y_sorted = y_ranks[begin : begin + resamples][:, order]
                numerator = np.einsum("bmn,bmn,bmn->bm", weight, x_ranks, y_sorted)
                x_ss = np.einsum("bmn,bmn,bmn->bm", weight, x_ranks, x_ranks)
                denominator = np.sqrt(x_ss * y_ss[begin : begin + resamples, None])
                with np.errstate(divide="ignore", invalid="ignore"):
                    rho = np.where(denominator > 0, numerator / denominator, np.nan)
                boot[begin : begin + resamples, cols] = np.clip(rho, -1.0, 1.0)
            bar.update(len(cols))
    return boot


def _percentile_interval(boot: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of each column of ``boot`` (n_bootstrap, m), ignoring NaN resamples."""
    usable = np.isfinite(boot).sum(axis=0)
    low = np.full(boot.shape[1], np.nan)
    high = np.full(boot.shape[1], np.nan)
    ok = usable > 0
    if ok.any():
        low[ok], high[ok] = np.nanquantile(boot[:, ok], [alpha / 2.0, 1.0 - alpha / 2.0], axis=0)
    degenerate = boot.shape[0] - usable
    if ok.any() and degenerate[ok].max() > 0.05 * boot.shape[0]:
        logger.warning(
            "Up to %d of %d bootstrap resamples were constant for some features; their intervals use the rest.",
            int(degenerate[ok].max()), boot.shape[0],
        )
    return low, high


def max_abs_rho_summary(
    correlations: pd.DataFrame,
    by: Sequence[str] = ("mask",),
    *,
    reliability: dict | None = None,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Reduce a correlation grid to the feature with the largest ``|rho|`` in each group.

    To summarise several tasks, concatenate their ``correlate`` outputs with a
    ``task`` column and pass ``by=("task", "mask")``.

    Args:
        correlations: output of ``correlate`` (or several, concatenated).
        by: columns to group by.
        reliability: output of ``split_half_reliability``; by default the one
            stored in ``correlations.attrs`` by ``correlate``, if any.
        alpha: q-value threshold for ``n_significant``.

    Returns:
        One row per group with the ``by`` columns, ``max_abs_rho``, the
        attaining feature's keys, ``rho``, ``ci_low``, ``ci_high``, ``q_value``
        and ``n``, then ``n_features`` (features in the group),
        ``n_nan`` (features with NaN rho), ``n_significant`` (q < ``alpha``),
        and the utility's ``reliability`` (Spearman-Brown) and ``ceiling``
        (its square root), NaN when unknown. A group where every rho is NaN
        gets NaN and empty keys.
    """
    by = [by] if isinstance(by, str) else list(by)
    required = ["rho", "ci_low", "ci_high", "q_value", "n"]
    missing = [name for name in by + required if name not in correlations.columns]
    if missing:
        raise ValueError(
            f"correlations has no column {missing}; available: {list(correlations.columns)}. "
            "Pass the output of correlate and group by its key columns."
        )
    if reliability is None:
        reliability = correlations.attrs.get("reliability")
    spearman_brown = np.nan if reliability is None else reliability["spearman_brown"]
    ceiling = np.nan if reliability is None else reliability["ceiling"]
    keys = [key for key in FEATURE_KEYS if key not in by and key in correlations.columns]

    rows = []
    for group_values, group in correlations.groupby(by, sort=True, dropna=False):
        group_values = group_values if isinstance(group_values, tuple) else (group_values,)
        row = dict(zip(by, group_values))
        magnitude = group["rho"].abs()
        if magnitude.notna().any():
            best = group.loc[magnitude.idxmax()]
            row["max_abs_rho"] = float(abs(best["rho"]))
            row.update({key: best[key] for key in keys})
            row.update({name: best[name] for name in required})
        else:
            row["max_abs_rho"] = np.nan
            row.update({key: None for key in keys})
            row.update({name: np.nan for name in required})
        row["n_features"] = len(group)
        row["n_nan"] = int(group["rho"].isna().sum())
        row["n_significant"] = int((group["q_value"] < alpha).sum())
        row["reliability"] = spearman_brown
        row["ceiling"] = ceiling
        rows.append(row)
    return pd.DataFrame(rows)
