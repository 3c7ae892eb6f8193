"""Mergeable central moments in float64, combined with the Chan / Pébay update formulas.

A ``Moments`` object stores, for any array of independent groups, the count
``n``, the mean and the central sums ``m2 = sum (x - mean)^2``, ``m3`` and
``m4``. Two such summaries of disjoint samples merge exactly with the
pairwise update formulas, and many at once with their multi-group form. So a
batch, several batches, or shards computed on different machines give the
same statistics up to float64 rounding. Extraction uses the multi-group form to turn
per-token moments (over ``d_model`` values) into the moments of a whole span
without a second pass over the activations.

The derived statistics follow ``scipy.stats``: ``variance`` is the population
variance (``ddof=0``), ``skewness`` is ``skew(bias=True)`` and ``kurtosis`` is
``kurtosis(fisher=True, bias=True)``, the excess kurtosis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float

from actsel.activations.workspace import Workspace


@dataclass
class Moments:
    """Count, mean and central sums of powers 2 to 4 of one or more groups (arrays of one shape)."""

    n: np.ndarray
    mean: np.ndarray
    m2: np.ndarray
    m3: np.ndarray
    m4: np.ndarray

    def __post_init__(self) -> None:
        arrays = [np.asarray(getattr(self, name), dtype=np.float64) for name in ("n", "mean", "m2", "m3", "m4")]
        shapes = {array.shape for array in arrays}
        if len(shapes) != 1:
            raise ValueError(f"n, mean, m2, m3 and m4 must share one shape, got {sorted(shapes)}.")
        self.n, self.mean, self.m2, self.m3, self.m4 = arrays

    @classmethod
    def from_values(cls, values, axis: int | tuple[int, ...] | None = None) -> "Moments":
        """Summarise ``values`` along ``axis`` (all axes when None), centring in float64 (two passes)."""
        values = np.asarray(values, dtype=np.float64)
        mean = values.mean(axis=axis, keepdims=True)
        centred = values - mean
        squared = centred * centred
        n = np.full(np.squeeze(mean, axis=axis).shape, values.size / mean.size)
        return cls(
            n=n,
            mean=np.squeeze(mean, axis=axis),
            m2=squared.sum(axis=axis),
            m3=(squared * centred).sum(axis=axis),
            m4=(squared * squared).sum(axis=axis),
        )

    def merge(self, other: "Moments") -> "Moments":
        """Combine with the moments of a disjoint sample (pairwise update; empty groups allowed)."""
        n_a, n_b = self.n, other.n
        n = n_a + n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            share_b = np.where(n > 0, n_b / n, 0.0)
            mean = self.mean + delta * share_b
            product = n_a * n_b
            m2 = self.m2 + other.m2 + delta**2 * np.where(n > 0, product / n, 0.0)
            m3 = (
                self.m3 + other.m3
                + delta**3 * np.where(n > 0, product * (n_a - n_b) / n**2, 0.0)
                + 3.0 * delta * np.where(n > 0, (n_a * other.m2 - n_b * self.m2) / n, 0.0)
            )
            m4 = (
                self.m4 + other.m4
                + delta**4 * np.where(n > 0, product * (n_a**2 - n_a * n_b + n_b**2) / n**3, 0.0)
                + 6.0 * delta**2 * np.where(n > 0, (n_a**2 * other.m2 + n_b**2 * self.m2) / n**2, 0.0)
                + 4.0 * delta * np.where(n > 0, (n_a * other.m3 - n_b * self.m3) / n, 0.0)
            )
        # An empty side contributes nothing; its mean may be NaN, which the
        # formulas above would otherwise spread.
        empty_a, empty_b = n_a == 0, n_b == 0
        result = [mean, m2, m3, m4]
        for index, (mine, theirs) in enumerate(zip((self.mean, self.m2, self.m3, self.m4),
                                                   (other.mean, other.m2, other.m3, other.m4))):
            result[index] = np.where(empty_a, theirs, np.where(empty_b, mine, result[index]))
        return Moments(n, *result)

    @property
    def variance(self) -> np.ndarray:
        """Population variance (``ddof=0``)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.m2 / self.n, np.nan)

    @property
    def skewness(self) -> np.ndarray:
        """Biased sample skewness, ``m3/n / (m2/n)^1.5``; NaN for a constant or empty sample."""
        with np.errstate(invalid="ignore", divide="ignore"):
            value = np.sqrt(self.n) * self.m3 / self.m2**1.5
        return np.where((self.n > 0) & (self.m2 > 0), value, np.nan)

    @property
    def kurtosis(self) -> np.ndarray:
        """Excess kurtosis, ``n m4 / m2^2 - 3``; NaN for a constant or empty sample."""
        with np.errstate(invalid="ignore", divide="ignore"):
            value = self.n * self.m4 / self.m2**2 - 3.0
        return np.where((self.n > 0) & (self.m2 > 0), value, np.nan)

    def __getitem__(self, index) -> "Moments":
        return Moments(self.n[index], self.mean[index], self.m2[index], self.m3[index], self.m4[index])


def token_moments(
    activations: Float[torch.Tensor, "batch pos d_model"],
    workspace: Workspace | None = None,
) -> tuple[Float[torch.Tensor, "batch pos"], ...]:
    """Compute each token's mean and central sums m2, m3, m4 over its last dimension, in float64.

    Args:
        activations: values of any floating dtype; never modified.
        workspace: keeps the two float64 scratch copies between calls; fresh ones when ``None``.

    Returns:
        ``(mean, m2, m3, m4)``, each of shape (batch, pos) and dtype float64.
    """
    workspace = workspace if workspace is not None else Workspace()
    centred = workspace.get("centred", activations.shape, torch.float64, activations.device)
    squared = workspace.get("squared", activations.shape, torch.float64, activations.device)
    centred.copy_(activations)
    mean = centred.mean(dim=-1)
    centred.sub_(mean[..., None])
    torch.mul(centred, centred, out=squared)
    m2 = squared.sum(-1)
    m3 = centred.mul_(squared).sum(-1)
    m4 = squared.mul_(squared).sum(-1)
    return mean, m2, m3, m4


def combine_tokens(
    token_stats: tuple[torch.Tensor, ...],
    in_span: Bool[torch.Tensor, "*spans batch pos"],
    d: int,
) -> tuple[torch.Tensor, ...]:
    """Merge per-token moments into span moments with the multi-group Pébay formulas.

    For groups k of equal size d with means ``mean_k`` and central sums
    ``m2_k, m3_k, m4_k``, and ``delta_k = mean_k - mean``::

        m2 = sum_k m2_k + d delta_k^2
        m3 = sum_k m3_k + 3 delta_k m2_k + d delta_k^3
        m4 = sum_k m4_k + 4 delta_k m3_k + 6 delta_k^2 m2_k + d delta_k^4

    Args:
        token_stats: ``(mean, m2, m3, m4)`` from ``token_moments``, shape (batch, pos).
        in_span: True for the tokens in each row's span; leading dimensions
            (several spans at once) broadcast against ``token_stats``.
        d: number of values per token.

    Returns:
        ``(n, mean, m2, m3, m4)`` of each row's span, shape ``in_span.shape[:-1]``,
        float64. Rows with an empty span get ``n = 0`` and NaN for the rest.
        Tokens outside the span never contribute, even when their values are
        not finite.
    """
    mean_t, m2_t, m3_t, m4_t = token_stats
    zero = torch.zeros((), dtype=mean_t.dtype, device=mean_t.device)

    def span_sum(term: torch.Tensor) -> torch.Tensor:
        return torch.where(in_span, term, zero).sum(-1)

    tokens = in_span.sum(-1).to(mean_t.dtype)
    mean = span_sum(mean_t) / tokens
    delta = mean_t - mean[..., None]
    delta2 = delta * delta
    m2 = span_sum(m2_t + d * delta2)
    m3 = span_sum(m3_t + 3.0 * delta * m2_t + d * delta2 * delta)
    m4 = span_sum(m4_t + 4.0 * delta * m3_t + 6.0 * delta2 * m2_t + d * delta2 * delta2)
    nan = torch.full_like(mean, float("nan"))
    empty = tokens == 0
    return (tokens * d, mean, torch.where(empty, nan, m2), torch.where(empty, nan, m3), torch.where(empty, nan, m4))
