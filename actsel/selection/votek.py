"""Vote-k selective annotation (Su et al., 2022).

Source: Hongjin Su, Jungo Kasai, Chen Henry Wu, et al., "Selective Annotation
Makes Language Models Better Few-Shot Learners", ICLR 2023, arXiv:2209.01975,
Algorithm 1 and Section 2.1, with the released code
(github.com/xlang-ai/icl-selective-annotation, ``two_steps.py``) read for the
details below.

Graph. Every candidate ``v`` votes for its ``k`` nearest other candidates by
cosine similarity of their embeddings (an edge ``v -> u`` means ``u`` is among
``v``'s k nearest neighbours, "v covers u"). The paper uses k = 150.

Score. With ``L`` the selected set, a voter's weight is
``s(v) = rho ** -|{l in L : v covers l}|`` (rho = 10 in the paper), so a voter
that already covers a selected example counts ten times less for each. The
vote-k score of an unselected candidate is the sum of ``s(v)`` over its
unselected voters ``v``. The greedy stage repeatedly selects the candidate with
the highest score and updates the weights.

Two stages. ``fast-votek`` runs the greedy stage for the whole budget. Full
``votek`` runs it for ``budget // 10`` examples (at least one) and uses them as
in-context examples to compute the model's confidence on every remaining
candidate. It then sorts those by confidence and splits them into
``budget - budget // 10`` equal-sized strata. Each stratum gives its
highest-scoring candidate, and the greedy discount carries across strata.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
from jaxtyping import Float, Int
from scipy import sparse

from actsel.selection.base import SelectionContext, register_selector
from actsel.selection.embeddings import cosine_similarity_matrix
from actsel.selection.predictions import prediction_confidence

logger = logging.getLogger(__name__)

DEFAULT_GRAPH_K = 150
DEFAULT_RHO = 10.0

# Coverage matrix: 1 at [v, u] when v covers u; scipy sparse from ``adjacency_from_neighbors``, dense also works.
Adjacency = sparse.csr_array | np.ndarray


def knn_graph(embeddings: Float[np.ndarray, "n d"], k: int, *, block_size: int = 1024) -> Int[np.ndarray, "n k"]:
    """Return each node's ``k`` nearest other nodes by cosine similarity, nearest first.

    ``k`` is capped at ``n - 1``. Ties are broken by lower index, so the graph
    is deterministic. Similarities are computed ``block_size`` rows at a time
    to bound memory on large pools.
    """
    n = embeddings.shape[0]
    if k < 1:
        raise ValueError(f"Graph k must be at least 1, got {k}.")
    k = min(k, n - 1)
    neighbors = np.zeros((n, k), dtype=np.int64)
    for start in range(0, n, block_size):
        rows = np.arange(start, min(start + block_size, n))
        similarity = cosine_similarity_matrix(embeddings[rows], embeddings)  # (block, n)
        similarity[np.arange(len(rows)), rows] = -np.inf  # a node never votes for itself
        neighbors[rows] = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return neighbors


def adjacency_from_neighbors(neighbors: Int[np.ndarray, "n k"], n: int) -> sparse.csr_array:
    """Return the sparse (n, n) matrix ``A`` with ``A[v, u] = 1`` when ``v`` covers (votes for) ``u``."""
    neighbors = np.asarray(neighbors, dtype=np.int64)
    rows = np.repeat(np.arange(neighbors.shape[0]), neighbors.shape[1])
    columns = neighbors.reshape(-1)
    keep = rows != columns
    ones = np.ones(int(keep.sum()), dtype=np.float64)
    adjacency = sparse.csr_array((ones, (rows[keep], columns[keep])), shape=(n, n))
    adjacency.sum_duplicates()
    adjacency.data[:] = 1.0
    return adjacency


def votek_scores(adjacency: Adjacency, selected: np.ndarray, rho: float = DEFAULT_RHO) -> Float[np.ndarray, "n"]:
    """Return the vote-k score of every node given the bool ``selected`` mask.

    ``adjacency`` is the (n, n) coverage matrix, sparse or dense, with 1 where v covers u.

    ``score(u) = sum over unselected v covering u of rho ** -|{l selected : v covers l}|``.
    Selected nodes get ``-inf``.
    """
    coverage = adjacency @ selected.astype(np.float64)  # selected nodes each voter covers
    weight = np.where(selected, 0.0, rho ** -coverage)
    scores = np.asarray(adjacency.T @ weight, dtype=np.float64)
    scores[selected] = -np.inf
    return scores


def greedy_votek(adjacency: Adjacency, n_select: int, *, rho: float = DEFAULT_RHO,
                 selected: Sequence[int] = (), candidates: Sequence[int] | None = None) -> list[int]:
    """Select ``n_select`` nodes one at a time by the highest vote-k score.

    Args:
        adjacency: (n, n) coverage matrix, 1 at ``[v, u]`` when v covers u.
        n_select: nodes to add.
        rho: discount base, greater than 1.
        selected: nodes already selected; they discount voters and are never returned.
        candidates: nodes that may be picked; ``None`` for all.

    Returns:
        The new nodes in the order picked. Ties go to the lower index.
    """
    if rho <= 1:
        raise ValueError(f"rho must be greater than 1, got {rho}.")
    n = adjacency.shape[0]
    mask = np.zeros(n, dtype=bool)
    mask[list(selected)] = True
    allowed = np.ones(n, dtype=bool) if candidates is None else np.isin(np.arange(n), list(candidates))
    picked: list[int] = []
    for _ in range(n_select):
        scores = np.where(allowed & ~mask, votek_scores(adjacency, mask, rho), -np.inf)
        if not np.isfinite(scores).any():
            raise ValueError(f"Only {len(picked)} candidates remain for {n_select} picks.")
        best = int(np.argmax(scores))
        picked.append(best)
        mask[best] = True
    return picked


def stratified_votek(adjacency: Adjacency, n_select: int, confidence: Float[np.ndarray, "n"],
                     *, rho: float = DEFAULT_RHO, selected: Sequence[int] = ()) -> list[int]:
    """Pick ``n_select`` unselected nodes, one per confidence stratum, by the highest vote-k score.

    The unselected nodes are sorted by ``confidence`` (lowest first, ties by
    index), split into ``n_select`` strata of sizes differing by at most one,
    and each stratum contributes its highest-scoring node. The discount carries
    over from one stratum's pick to the next.

    NOTE: the released code sizes each stratum as ``int(0.9 * n_pool / n_select)``,
    so the candidates at the end of its sort order are never considered. Here
    the strata cover every unselected node.
    """
    n = adjacency.shape[0]
    mask = np.zeros(n, dtype=bool)
    mask[list(selected)] = True
    remaining = np.flatnonzero(~mask)
    if n_select > len(remaining):
        raise ValueError(f"Cannot pick {n_select} nodes; only {len(remaining)} are unselected.")
    order = remaining[np.argsort(confidence[remaining], kind="stable")]
    picked: list[int] = []
    for stratum in np.array_split(order, n_select):
        scores = votek_scores(adjacency, mask, rho)[stratum]
        best = int(stratum[int(np.argmax(scores))])
        picked.append(best)
        mask[best] = True
    return picked


def two_stage_votek(adjacency: Adjacency, budget: int,
                    confidence_fn: Callable[[list[int], list[int]], np.ndarray], *,
                    rho: float = DEFAULT_RHO, selected: Sequence[int] = ()) -> list[int]:
    """Run the full two-stage vote-k for ``budget`` new nodes.

    Args:
        adjacency: (n, n) coverage matrix.
        budget: nodes to add.
        confidence_fn: ``fn(annotated, unlabeled) -> confidence`` with one value
            per unlabeled node, the annotated nodes serving as in-context examples.
        rho: discount base.
        selected: nodes annotated before this call. When there are some, they
            take the place of the first stage.
    """
    selected = list(selected)
    first: list[int] = []
    if not selected:
        first = greedy_votek(adjacency, max(1, budget // 10), rho=rho)
    annotated = selected + first
    n_rest = budget - len(first)
    if n_rest == 0:
        return first
    unlabeled = [i for i in range(adjacency.shape[0]) if i not in set(annotated)]
    confidence = np.full(adjacency.shape[0], np.inf)
    confidence[unlabeled] = confidence_fn(annotated, unlabeled)
    return first + stratified_votek(adjacency, n_rest, confidence, rho=rho, selected=annotated)


def _pool_graph(context: SelectionContext, graph_k: int) -> sparse.csr_array:
    """Return the coverage matrix over the whole pool (rows in pool order)."""
    embeddings = context.embeddings(context.task.pool)
    return adjacency_from_neighbors(knn_graph(embeddings, graph_k), len(context.task.pool))


@register_selector("fast-votek", retrieval="fixed")
def select_fast_votek(context: SelectionContext, budget: int, seed: int, *, graph_k: int = DEFAULT_GRAPH_K,
                      rho: float = DEFAULT_RHO) -> list[str]:
    """Greedy vote-k (Su et al., 2022) for the whole budget; deterministic, ``seed`` unused."""
    pool = context.task.pool
    index = {example.uid: i for i, example in enumerate(pool)}
    adjacency = _pool_graph(context, graph_k)
    picked = greedy_votek(adjacency, budget, rho=rho, selected=[index[uid] for uid in context.selected])
    return [pool[i].uid for i in picked]


@register_selector("votek", retrieval="fixed")
def select_votek(context: SelectionContext, budget: int, seed: int, *, graph_k: int = DEFAULT_GRAPH_K,
                 rho: float = DEFAULT_RHO) -> list[str]:
    """Two-stage vote-k (Su et al., 2022): greedy for budget/10, then one pick per confidence stratum.

    The confidence of an unlabeled candidate is the model's log-probability of
    its own prediction with the ``context.k`` most similar annotated examples
    as demonstrations (the paper's similarity-based prompt retrieval), most
    similar last.
    """
    model = context.require_model("votek")
    pool = context.task.pool
    index = {example.uid: i for i, example in enumerate(pool)}
    embeddings = context.embeddings(pool)
    adjacency = adjacency_from_neighbors(knn_graph(embeddings, graph_k), len(pool))

    def confidence_fn(annotated: list[int], unlabeled: list[int]) -> np.ndarray:
        similarity = cosine_similarity_matrix(embeddings[unlabeled], embeddings[annotated])
        demos = []
        for row in similarity:
            nearest = np.argsort(-row, kind="stable")[: context.k][::-1]
            demos.append([pool[annotated[j]] for j in nearest])
        return prediction_confidence(model, context.task, demos, [pool[i] for i in unlabeled],
                                     batch_size=context.batch_size, progress=context.progress)

    picked = two_stage_votek(adjacency, budget, confidence_fn, rho=rho,
                             selected=[index[uid] for uid in context.selected])
    return [pool[i].uid for i in picked]
