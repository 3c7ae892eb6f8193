"""Utility estimators: how much a candidate helps as an in-context demonstration.

Three estimators, each returning a ``UtilityResult`` with a value, a standard
error and a split-half estimate per candidate (definitions and sources in
``docs/concepts-utility.md``):

- ``one_shot``: mean per-query gain of the 1-shot prompt with the candidate over
  the zero-shot prompt, on the same queries.
- ``conditional``: conditional accuracy (Chang and Jia, 2023, "Data Curation
  Alone Can Stabilize In-context Learning"): over M random k-shot prompts, the
  mean score of the prompts that contain the candidate minus the mean score of
  all prompts.
- ``influence``: in-context influence (Nguyen and Wong, 2023, "In-context
  Example Selection with Influences"): the mean score of the sampled prompts
  with the candidate minus the mean of those without it.

``conditional`` and ``influence`` share one sampling procedure, so with the same
seed they score the same prompts. A new estimator is one function registered
with ``register_estimator``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.tasks.base import Example, Task
from actsel.utility.metrics import check_metric, default_metric
from actsel.utility.result import UtilityResult
from actsel.utility.scoring import MaskSpec, score_with_prefix

logger = logging.getLogger(__name__)


@dataclass
class EstimatorConfig:
    """Settings shared by the utility estimators.

    Attributes:
        metric: per-query metric, one of ``METRICS``.
        mask: attention-mask strategy name or callable, None for causal.
        seed: seed of the random prompt draws and of the split into halves.
        n_prompts: number of sampled k-shot prompts (``conditional``, ``influence``).
        k: demonstrations per sampled prompt.
        label_balanced: draw each sampled prompt with equal label counts (the
            remainder of k over the labels goes to randomly chosen labels).
        queries_per_prompt: queries drawn at random for each sampled prompt;
            None scores every query with every prompt.
        batch_size: queries per forward pass.
        progress: show progress bars.
    """

    metric: str
    mask: MaskSpec = None
    seed: int = 0
    n_prompts: int = 200
    k: int = 4
    label_balanced: bool = False
    queries_per_prompt: int | None = None
    batch_size: int = 32
    progress: bool = True

    def __post_init__(self) -> None:
        if self.n_prompts < 2:
            raise ValueError(f"n_prompts must be at least 2 (two halves), got {self.n_prompts}.")
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}.")
        if self.queries_per_prompt is not None and self.queries_per_prompt < 1:
            raise ValueError(f"queries_per_prompt must be None or at least 1, got {self.queries_per_prompt}.")

    def describe(self) -> dict:
        """Return the settings as JSON-serialisable values (a callable mask by its name)."""
        values = asdict(self)
        if callable(self.mask):
            values["mask"] = getattr(self.mask, "__name__", repr(self.mask))
        return values


Estimator = Callable[[HookedTransformer, Task, list[Example], list[Example], EstimatorConfig], UtilityResult]
UTILITY_ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register an estimator under ``name``; raises ValueError if the name is taken."""

    def decorator(function: Estimator) -> Estimator:
        if name in UTILITY_ESTIMATORS:
            raise ValueError(f"Utility estimator {name!r} is already registered; choose another name.")
        UTILITY_ESTIMATORS[name] = function
        return function

    return decorator


def estimate_utility(
    model: HookedTransformer,
    task: Task,
    estimator: str = "one_shot",
    *,
    metric: str | None = None,
    candidates: Sequence[Example] | None = None,
    queries: Sequence[Example] | None = None,
    mask: MaskSpec = None,
    seed: int = 0,
    n_prompts: int = 200,
    k: int = 4,
    label_balanced: bool = False,
    batch_size: int = 32,
    progress: bool = True,
    queries_per_prompt: int | None = None,
) -> UtilityResult:
    """Estimate each candidate's utility as a demonstration.

    Args:
        model: the model.
        task: the task; ``candidates`` default to ``task.pool`` and ``queries``
            to ``task.eval``.
        estimator: a name in ``UTILITY_ESTIMATORS`` (``"one_shot"``,
            ``"conditional"``, ``"influence"``).
        metric: per-query metric; ``default_metric(task)`` when None.
        candidates: examples whose utility is estimated; uids must be unique.
        queries: evaluation queries.
        mask: attention-mask strategy applied while scoring.
        seed: seed of the prompt draws and the split into halves.
        n_prompts, k, label_balanced, queries_per_prompt: sampling settings of
            ``conditional`` and ``influence`` (ignored by ``one_shot``).
        batch_size: queries per forward pass.
        progress: show progress bars.

    Returns:
        A ``UtilityResult`` in candidate order. A candidate that appears in no
        sampled prompt gets NaN value and standard error.
    """
    if estimator not in UTILITY_ESTIMATORS:
        raise ValueError(f"Unknown utility estimator {estimator!r}; valid: {sorted(UTILITY_ESTIMATORS)}.")
    metric = default_metric(task) if metric is None else metric
    check_metric(task, metric)
    candidates = list(task.pool if candidates is None else candidates)
    queries = list(task.eval if queries is None else queries)
    if not candidates:
        raise ValueError("No candidates: pass a non-empty list of examples or a task with a pool.")
    if len(queries) < 2:
        raise ValueError(f"Need at least 2 queries to split into halves, got {len(queries)}.")
    uids = [example.uid for example in candidates]
    if len(set(uids)) != len(uids):
        raise ValueError("Candidate uids must be unique; remove duplicate examples.")
    overlap = set(uids) & {query.uid for query in queries}
    if overlap:
        logger.warning("%d candidates are also queries (for example %r); their utility includes the answer "
                       "leaking into the prompt", len(overlap), sorted(overlap)[0])
    config = EstimatorConfig(metric=metric, mask=mask, seed=seed, n_prompts=n_prompts, k=k,
                             label_balanced=label_balanced, queries_per_prompt=queries_per_prompt,
                             batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    result = UTILITY_ESTIMATORS[estimator](model, task, candidates, queries, config)
    result.metadata.update({
        "task": task.name,
        "model": model.cfg.model_name,
        "n_candidates": len(candidates),
        "n_queries": len(queries),
        "seconds": round(time.perf_counter() - start, 3),
        **config.describe(),
    })
    return result


def _split_halves(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


@register_estimator("one_shot")
def one_shot_gain(model: HookedTransformer, task: Task, candidates: list[Example], queries: list[Example],
                  config: EstimatorConfig) -> UtilityResult:
    """Mean over queries of (score with the candidate as the only demonstration) minus (zero-shot score).

    The standard error is that of the mean of the paired per-query differences;
    the halves are the same mean over a random half of the queries and over the
    other half.
    """
    rng = np.random.default_rng(config.seed)

    def score(demos: list[Example]) -> np.ndarray:
        return score_with_prefix(model, task, demos, queries, config.metric, mask=config.mask,
                                 batch_size=config.batch_size)

    zero_shot = score([])
    gains = np.empty((len(candidates), len(queries)), dtype=np.float64)
    for row, candidate in enumerate(tqdm(candidates, desc="one-shot utility", disable=not config.progress)):
        gains[row] = score([candidate]) - zero_shot
    half_a, half_b = _split_halves(len(queries), rng)
    halves = np.stack([gains[:, half_a].mean(axis=1), gains[:, half_b].mean(axis=1)])
    stderr = gains.std(axis=1, ddof=1) / np.sqrt(len(queries))
    return UtilityResult(
        [c.uid for c in candidates], gains.mean(axis=1), stderr, halves, "one_shot", config.metric,
        {"zero_shot_mean": float(zero_shot.mean())},
    )


def sample_prompt_demos(candidates: Sequence[Example], k: int, n_prompts: int, rng: np.random.Generator,
                        label_balanced: bool = False, labels: Sequence[str] | None = None) -> list[np.ndarray]:
    """Draw ``n_prompts`` sets of ``k`` distinct candidate indices, each in random order.

    With ``label_balanced`` each set has ``k // L`` candidates of each of the L
    labels (``labels``, or those present among the candidates), plus one more
    for ``k % L`` labels chosen at random per prompt.
    """
    n = len(candidates)
    if k > n:
        raise ValueError(f"k={k} exceeds the {n} candidates; lower k or pass more candidates.")
    if not label_balanced:
        return [rng.permutation(n)[:k] for _ in range(n_prompts)]
    labels = list(labels) if labels else sorted({c.label for c in candidates})
    by_label = {label: np.array([i for i, c in enumerate(candidates) if c.label == label]) for label in labels}
    per_label, remainder = divmod(k, len(labels))
    needed = per_label + (1 if remainder else 0)
    short = {label: len(members) for label, members in by_label.items() if len(members) < needed}
    if short:
        raise ValueError(
            f"label_balanced k={k} prompts need {needed} candidates per label, but these labels have fewer: "
            f"{short}. Lower k, pass more candidates, or set label_balanced=False."
        )
    draws = []
    for _ in range(n_prompts):
        extra = set(rng.choice(len(labels), remainder, replace=False).tolist())
        chosen = [rng.choice(by_label[label], per_label + (i in extra), replace=False)
                  for i, label in enumerate(labels)]
        draws.append(rng.permutation(np.concatenate(chosen)))
    return draws


def _sampled_prompt_scores(
    model: HookedTransformer, task: Task, candidates: list[Example], queries: list[Example], config: EstimatorConfig
) -> tuple[list[np.ndarray], np.ndarray]:
    """Score ``n_prompts`` random k-shot prompts.

    Returns:
        ``(draws, scores)``: the candidate indices of each prompt in prompt
        order, and the mean metric of each prompt over its queries, shape
        (n_prompts,).
    """
    if config.label_balanced and task.kind != "classification":
        raise ValueError(f"label_balanced needs a classification task; {task.name!r} is {task.kind}.")
    rng = np.random.default_rng(config.seed)
    draws = sample_prompt_demos(candidates, config.k, config.n_prompts, rng, config.label_balanced,
                                task.labels if config.label_balanced else None)
    scores = np.empty(config.n_prompts, dtype=np.float64)
    per_prompt = config.queries_per_prompt
    for index, draw in enumerate(tqdm(draws, desc="sampled prompts", disable=not config.progress)):
        if per_prompt is None or per_prompt >= len(queries):
            chosen = queries
        else:
            chosen = [queries[i] for i in np.sort(rng.choice(len(queries), per_prompt, replace=False))]
        demos = [candidates[i] for i in draw]
        scores[index] = score_with_prefix(model, task, demos, chosen, config.metric, mask=config.mask,
                                          batch_size=config.batch_size).mean()
    return draws, scores


def _group_means(members: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per candidate: count, mean and variance (ddof 1) of the prompt scores with and without it."""
    def stats(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = mask.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (mask * scores[:, None]).sum(axis=0) / count
            var = (mask * (scores[:, None] - mean) ** 2).sum(axis=0) / (count - 1)
        mean = np.where(count > 0, mean, np.nan)
        var = np.where(count > 1, var, np.nan)
        return count, mean, var

    return stats(members) + stats(~members)


def _conditional_value(members: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_in, mean_in, var_in, *_ = _group_means(members, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return mean_in - scores.mean(), np.sqrt(var_in / n_in)


def _influence_value(members: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n_in, mean_in, var_in, n_out, mean_out, var_out = _group_means(members, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        return mean_in - mean_out, np.sqrt(var_in / n_in + var_out / n_out)


def _sampled_result(name: str, value_fn, model, task, candidates, queries, config) -> UtilityResult:
    draws, scores = _sampled_prompt_scores(model, task, candidates, queries, config)
    members = np.zeros((config.n_prompts, len(candidates)), dtype=bool)
    for index, draw in enumerate(draws):
        members[index, draw] = True
    value, stderr = value_fn(members, scores)
    half_a, half_b = _split_halves(config.n_prompts, np.random.default_rng([config.seed, 1]))
    halves = np.stack([value_fn(members[half], scores[half])[0] for half in (half_a, half_b)])
    counts = members.sum(axis=0)
    rare = int((counts < 2).sum())
    if rare:
        logger.warning("%d of %d candidates appear in fewer than 2 of %d sampled prompts; their utility is NaN "
                       "or has no standard error. Raise n_prompts or k.", rare, len(candidates), config.n_prompts)
    return UtilityResult(
        [c.uid for c in candidates], value, stderr, halves, name, config.metric,
        {"mean_prompt_score": float(scores.mean()), "prompt_counts": counts.tolist(),
         "prompt_scores": scores.tolist(), "prompt_demos": [[candidates[i].uid for i in draw] for draw in draws]},
    )


@register_estimator("conditional")
def conditional_accuracy(model: HookedTransformer, task: Task, candidates: list[Example], queries: list[Example],
                         config: EstimatorConfig) -> UtilityResult:
    """Mean score of the sampled prompts containing the candidate, minus the mean score of all sampled prompts.

    The standard error is that of the mean over the prompts with the candidate;
    the halves repeat the estimate on two disjoint random halves of the prompts.
    """
    return _sampled_result("conditional", _conditional_value, model, task, candidates, queries, config)


@register_estimator("influence")
def influence(model: HookedTransformer, task: Task, candidates: list[Example], queries: list[Example],
              config: EstimatorConfig) -> UtilityResult:
    """Mean score of the sampled prompts with the candidate minus the mean score of those without it.

    The standard error is the Welch standard error of that difference; the
    halves repeat the estimate on two disjoint random halves of the prompts.
    """
    return _sampled_result("influence", _influence_value, model, task, candidates, queries, config)
