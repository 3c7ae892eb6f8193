"""The built-in selectors other than vote-k (see ``votek.py``).

Every selector has the signature ``fn(context, budget, seed, **params)`` and
returns ``budget`` uids from ``context.available`` (the pool minus
``context.selected``). ``select`` in ``base.py`` has already checked the budget.

- ``random``: a uniform sample without replacement.
- ``kate``: the same sample as ``random`` with the same seed, evaluated with
  per-query similarity retrieval (Liu et al., 2022, "What Makes Good In-Context
  Examples for GPT-3?"), so that a paired comparison with ``random`` isolates
  the effect of retrieval.
- ``activation-rank``: the candidates with the highest (or lowest) value of
  one ``FeatureTable`` column.
- ``activation-diversity``: greedy k-center or k-means over standardised
  feature vectors.
- ``uncertainty``: the candidates on which the model's answer distribution has
  the highest entropy.
- ``oracle``: the candidates with the highest measured utility, an upper bound
  that needs labels and many model runs.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from jaxtyping import Float
from scipy.cluster.vq import kmeans2

from actsel.selection.base import SelectionContext, register_selector
from actsel.selection.predictions import prediction_entropy

logger = logging.getLogger(__name__)

RANK_ORDERS = ("highest", "lowest")
DIVERSITY_METHODS = ("kcenter", "kmeans")
DIVERSITY_SOURCES = ("features", "embeddings")
FEATURE_FILTERS = ("mask", "hook", "layer", "span", "statistic")


def _top_by_score(uids: Sequence[str], scores: np.ndarray, budget: int, seed: int) -> list[str]:
    """Return the ``budget`` uids with the highest scores; NaN ranks last and ties are broken at random by ``seed``."""
    rng = np.random.default_rng(seed)
    tie_break = rng.permutation(len(uids))
    keyed = np.where(np.isnan(scores), -np.inf, scores)
    order = np.lexsort((tie_break, -keyed))  # last key sorts first: score descending, then tie_break
    return [uids[i] for i in order[:budget]]


@register_selector("random", retrieval="fixed")
def select_random(context: SelectionContext, budget: int, seed: int) -> list[str]:
    """Pick a uniform random sample of the unselected pool."""
    available = context.available
    rng = np.random.default_rng(seed)
    return [available[i].uid for i in rng.choice(len(available), size=budget, replace=False)]


@register_selector("kate", retrieval="similar")
def select_kate(context: SelectionContext, budget: int, seed: int) -> list[str]:
    """Pick the ``random`` sample for this seed, meant for per-query similarity retrieval (KATE)."""
    return select_random(context, budget, seed)


def _feature_matrix(context: SelectionContext, uids: Sequence[str], filters: dict) -> np.ndarray:
    """Return the feature values of ``uids`` for the features matching ``filters``, shape (n, n_features)."""
    if context.features is None:
        raise ValueError("This strategy reads activation features; pass features=FeatureTable(...) to the context.")
    table = context.features.select(**filters) if filters else context.features
    try:
        table = table.take(list(uids))
    except KeyError as err:
        raise ValueError(f"The feature table does not cover the candidate pool: {err.args[0]}") from err
    return table.values


def _feature_filters(**given) -> dict:
    return {key: value for key, value in given.items() if value is not None}


@register_selector("activation-rank", retrieval="fixed")
def select_activation_rank(context: SelectionContext, budget: int, seed: int, *, statistic: str,
                           hook: str | None = None, layer: int | None = None, mask: str | None = None,
                           span: str | None = None, order: str = "highest") -> list[str]:
    """Pick the candidates with the highest (or lowest) value of one activation feature.

    The feature is the single ``FeatureTable`` column matching the given keys;
    give enough keys to pick exactly one. NaN values rank last.
    """
    if order not in RANK_ORDERS:
        raise ValueError(f"Unknown order {order!r}; valid: {RANK_ORDERS}.")
    if context.features is None:
        raise ValueError("activation-rank reads activation features; pass features=FeatureTable(...) to the context.")
    key = _feature_filters(mask=mask, hook=hook, layer=layer, span=span, statistic=statistic)
    column = context.features.feature_index(**key)
    uids = [example.uid for example in context.available]
    values = _feature_matrix(context, uids, {})[:, column]
    scores = values if order == "highest" else -values
    return _top_by_score(uids, scores, budget, seed)


def standardize_columns(values: Float[np.ndarray, "n f"]) -> Float[np.ndarray, "n f_kept"]:
    """Z-score each column; NaN becomes the column mean, and constant or all-NaN columns are dropped."""
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.all(np.isnan(values), axis=0)
    values = values[:, keep]
    means = np.nanmean(values, axis=0)
    filled = np.where(np.isnan(values), means, values)
    stds = filled.std(axis=0)
    varying = stds > 0
    return (filled[:, varying] - means[varying]) / stds[varying]


def greedy_k_center(points: Float[np.ndarray, "n d"], n_centers: int, *, initial: Sequence[int] = (),
                    seed: int = 0) -> list[int]:
    """Farthest-first traversal (Gonzalez, 1985): each new centre is the point farthest from all centres.

    Its covering radius is at most twice the optimal k-center radius.

    Args:
        points: one row per point.
        n_centers: new centres to add.
        initial: centres fixed beforehand; they are never returned.
        seed: picks the first centre at random when ``initial`` is empty.

    Returns:
        The new centres' row indices in the order picked.
    """
    n = points.shape[0]
    centers = list(initial)
    picked: list[int] = []
    if not centers:
        first = int(np.random.default_rng(seed).integers(n))
        centers.append(first)
        picked.append(first)
    distance = np.min(np.linalg.norm(points[:, None, :] - points[centers][None, :, :], axis=2), axis=1)
    while len(picked) < n_centers:
        distance[centers] = -np.inf
        farthest = int(np.argmax(distance))
        centers.append(farthest)
        picked.append(farthest)
        distance = np.minimum(distance, np.linalg.norm(points - points[farthest], axis=1))
    return picked


def covering_radius(points: Float[np.ndarray, "n d"], centers: Sequence[int]) -> float:
    """Return the largest distance from any point to its nearest centre."""
    distance = np.linalg.norm(points[:, None, :] - points[list(centers)][None, :, :], axis=2)
    return float(distance.min(axis=1).max())


def k_means_representatives(points: Float[np.ndarray, "n d"], n_clusters: int, *, seed: int = 0,
                            excluded: Sequence[int] = ()) -> list[int]:
    """Cluster with k-means (k-means++ start, ``scipy.cluster.vq.kmeans2``) and return the point nearest each centroid.

    Centroids are visited in order; each takes its nearest point not already
    taken or ``excluded``, so the result has ``n_clusters`` distinct rows.
    """
    allowed = np.setdiff1d(np.arange(points.shape[0]), np.asarray(list(excluded), dtype=int))
    centroids, _ = kmeans2(points[allowed], n_clusters, minit="++", seed=seed, missing="warn")
    taken: set[int] = set()
    picked: list[int] = []
    for centroid in centroids:
        distance = np.linalg.norm(points[allowed] - centroid, axis=1)
        for row in np.argsort(distance, kind="stable"):
            if int(allowed[row]) not in taken:
                picked.append(int(allowed[row]))
                taken.add(int(allowed[row]))
                break
    return picked


@register_selector("activation-diversity", retrieval="fixed")
def select_activation_diversity(context: SelectionContext, budget: int, seed: int, *, method: str = "kcenter",
                                source: str = "features", hook: str | None = None, layer: int | None = None,
                                mask: str | None = None, span: str | None = None,
                                statistic: str | None = None) -> list[str]:
    """Spread the picks over the feature space with greedy k-center or k-means.

    Feature vectors are the ``FeatureTable`` columns matching the given keys
    (all columns when none are given), standardised per column over the pool.
    ``source="embeddings"`` uses the context's embeddings instead. Already
    selected uids count as existing centres for k-center and are excluded for
    k-means.
    """
    if method not in DIVERSITY_METHODS:
        raise ValueError(f"Unknown diversity method {method!r}; valid: {DIVERSITY_METHODS}.")
    if source not in DIVERSITY_SOURCES:
        raise ValueError(f"Unknown diversity source {source!r}; valid: {DIVERSITY_SOURCES}.")
    pool = context.task.pool
    uids = [example.uid for example in pool]
    if source == "features":
        raw = _feature_matrix(context, uids, _feature_filters(mask=mask, hook=hook, layer=layer, span=span,
                                                               statistic=statistic))
    else:
        raw = context.embeddings(pool)
    points = standardize_columns(raw)
    if points.shape[1] == 0:
        raise ValueError("No feature varies across the pool (all constant or NaN); choose other features.")
    index = {uid: i for i, uid in enumerate(uids)}
    initial = [index[uid] for uid in context.selected]
    if method == "kcenter":
        picked = greedy_k_center(points, budget, initial=initial, seed=seed)
    else:
        picked = k_means_representatives(points, budget, seed=seed, excluded=initial)
    return [uids[i] for i in picked]


@register_selector("uncertainty", retrieval="fixed")
def select_uncertainty(context: SelectionContext, budget: int, seed: int) -> list[str]:
    """Pick the candidates whose predicted answer distribution has the highest entropy.

    In the first round the model predicts zero-shot. When ``context.selected``
    is not empty, the prediction uses one fixed prompt of ``min(k, |selected|)``
    selected examples drawn with ``seed``, so later rounds query where the
    current demonstrations leave the model unsure.
    """
    model = context.require_model("uncertainty")
    available = context.available
    demos = []
    if context.selected:
        by_uid = context.examples_by_uid
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(context.selected), size=min(context.k, len(context.selected)), replace=False)
        demos = [by_uid[context.selected[i]] for i in chosen]
    # Entropies depend only on the demonstrations, so runs with the same prompt reuse them.
    known = context.memo.setdefault(("uncertainty", tuple(demo.uid for demo in demos)), {})
    missing = [example for example in available if example.uid not in known]
    if missing:
        values = prediction_entropy(model, context.task, [demos] * len(missing), missing,
                                    batch_size=context.batch_size, progress=context.progress)
        known.update(zip((example.uid for example in missing), values))
    entropy = np.array([known[example.uid] for example in available])
    return _top_by_score([example.uid for example in available], entropy, budget, seed)


@register_selector("oracle", retrieval="fixed")
def select_oracle(context: SelectionContext, budget: int, seed: int) -> list[str]:
    """Pick the candidates with the highest measured utility, an upper bound. Ties are broken by ``seed``."""
    if context.utility is None:
        raise ValueError("oracle reads measured utilities; pass utility=UtilityResult(...) to the context.")
    uids = [example.uid for example in context.available]
    try:
        values = context.utility.take(uids).value
    except KeyError as err:
        raise ValueError(f"The utility result does not cover the candidate pool: {err.args[0]}") from err
    return _top_by_score(uids, values, budget, seed)
