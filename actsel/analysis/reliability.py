"""Split-half reliability of a utility estimate, and the correlation ceiling it implies.

A utility is estimated from a finite sample of evaluation queries or prompts,
so it is partly noise. Two estimates from disjoint halves of that sample
(``UtilityResult.halves``) agree only as far as the utility is reproducible.
Their correlation ``r_half``, stepped up to the full sample length with the
Spearman-Brown formula ``2 r / (1 + r)``, estimates the reliability of the full
estimate. Any feature, even a perfectly measured one, can then correlate with
the utility at most about ``sqrt(reliability)`` (the attenuation ceiling).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from scipy import stats

from actsel.utility.result import UtilityResult

logger = logging.getLogger(__name__)

RELIABILITY_METHODS = ("spearman", "pearson")


def split_half_reliability(utility: UtilityResult | np.ndarray, *, method: str = "spearman") -> dict:
    """Estimate the split-half reliability of a utility and the correlation ceiling.

    Args:
        utility: a ``UtilityResult`` or an array of shape (2, n) holding the two
            half estimates per example.
        method: ``"spearman"`` (default, matching the rank correlations of
            ``correlate``) or ``"pearson"``.

    Returns:
        A dict with ``r_half`` (correlation of the two halves over the examples
        where both are finite), ``spearman_brown`` (``2 r / (1 + r)``, the
        reliability of the full estimate), ``ceiling`` (``sqrt(spearman_brown)``,
        or 0.0 when the reliability is at or below zero) and ``n`` (examples
        used). The three numbers are NaN when fewer than 3 examples are finite
        or a half is constant.

    Raises:
        ValueError: for an unknown method or halves of the wrong shape.
    """
    if method not in RELIABILITY_METHODS:
        raise ValueError(f"Unknown reliability method {method!r}; valid: {list(RELIABILITY_METHODS)}.")
    halves = utility.halves if isinstance(utility, UtilityResult) else np.asarray(utility, dtype=np.float64)
    if halves.ndim != 2 or halves.shape[0] != 2:
        raise ValueError(f"halves must have shape (2, n), got {halves.shape}.")

    finite = np.isfinite(halves).all(axis=0)
    first, second = halves[0, finite], halves[1, finite]
    n = int(finite.sum())
    result = {"r_half": np.nan, "spearman_brown": np.nan, "ceiling": np.nan, "n": n}
    if n < 3 or np.ptp(first) == 0 or np.ptp(second) == 0:
        logger.warning("Split-half reliability is undefined: %d finite examples, or a constant half.", n)
        return result

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        correlation = stats.spearmanr if method == "spearman" else stats.pearsonr
        r_half = float(correlation(first, second)[0])
    result["r_half"] = r_half
    if r_half <= -1.0:
        # 2r / (1 + r) has a pole at r = -1; the halves disagree completely.
        result["spearman_brown"] = -np.inf
    else:
        result["spearman_brown"] = 2.0 * r_half / (1.0 + r_half)
    if result["spearman_brown"] <= 0:
        logger.warning(
            "The utility halves do not agree (r_half = %.3f); no feature can correlate reliably with this utility.",
            r_half,
        )
    result["ceiling"] = float(np.sqrt(max(result["spearman_brown"], 0.0)))
    return result
