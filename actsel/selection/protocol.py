"""The selective-annotation experiment: select with a budget, then k-shot prediction on held-out queries.

For every strategy, seed and budget ``B``:

1. Selection. The strategy picks ``B`` examples of the task's pool to annotate.
   With ``rounds > 1`` it picks them in that many chunks, and each chunk's
   selector receives the examples already picked as ``context.selected``.
   Uncertainty, for example, then scores candidates with the current picks as
   demonstrations.
2. Evaluation. Each evaluation query gets k demonstrations from the selected
   examples only, never from the rest of the pool and never the query itself.
   ``"fixed"`` retrieval draws one prompt of k selected examples with the seed
   and scores every query after it (prefix cached, ``score_with_prefix``).
   ``"similar"`` retrieval (KATE) gives each query its k most similar selected
   examples by cosine similarity of embeddings, most similar last
   (``score_prompts``).

``SelectionResults.table`` reports the mean and standard deviation over seeds
of the mean per-query score, and a paired comparison with ``random`` at the
same budget and seed (``scipy.stats.ttest_rel`` and ``scipy.stats.wilcoxon``).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.activations.table import FeatureTable
from actsel.io import atomic_path, write_json_atomic
from actsel.selection.base import SelectionContext, Strategy, as_strategy, select
from actsel.selection.embeddings import EmbeddingCache, EmbeddingFn, cosine_similarity_matrix, default_embedding_fn
from actsel.tasks.base import Example, Task
from actsel.utility.result import UtilityResult

logger = logging.getLogger(__name__)

BASELINE = "random"
RAW_COLUMNS = ("strategy", "selector", "retrieval", "budget", "seed", "score", "metric", "n_eval", "rounds",
               "selected", "select_seconds", "eval_seconds")


def default_selection_metric(task: Task) -> str:
    """Return ``"accuracy"`` for classification and ``"exact_match"`` for generation."""
    return "accuracy" if task.kind == "classification" else "exact_match"


def retrieve_similar(query_vectors: np.ndarray, query_uids: Sequence[str], candidate_vectors: np.ndarray,
                     candidate_uids: Sequence[str], k: int) -> list[list[int]]:
    """Return, for each query, the indices of its ``k`` most similar candidates, most similar last.

    Similarity is cosine similarity. A candidate with the query's own uid is
    never returned; ties go to the lower candidate index.

    Args:
        query_vectors: shape (n_queries, d).
        query_uids: the queries' uids.
        candidate_vectors: shape (n_candidates, d).
        candidate_uids: the candidates' uids.
        k: demonstrations per query; at most the number of candidates other than the query.

    Returns:
        One list of ``k`` candidate indices per query.
    """
    similarity = cosine_similarity_matrix(query_vectors, candidate_vectors)
    candidate_position = {uid: i for i, uid in enumerate(candidate_uids)}
    retrieved = []
    for row, uid in enumerate(query_uids):
        scores = similarity[row].copy()
        if uid in candidate_position:
            scores[candidate_position[uid]] = -np.inf
        n_valid = int(np.isfinite(scores).sum())
        if k > n_valid:
            raise ValueError(f"Query {uid!r} has only {n_valid} candidates to retrieve from, fewer than k={k}.")
        nearest = np.argsort(-scores, kind="stable")[:k]
        retrieved.append([int(i) for i in nearest[::-1]])
    return retrieved


def _score(model: HookedTransformer, task: Task, demos_per_query: Sequence[Sequence[Example]],
           queries: Sequence[Example], metric: str, *, fixed: bool, mask, batch_size: int) -> np.ndarray:
    from actsel.utility.scoring import score_prompts, score_with_prefix

    if fixed:
        return score_with_prefix(model, task, demos_per_query[0], queries, metric, mask=mask, batch_size=batch_size)
    return score_prompts(model, task, demos_per_query, queries, metric, mask=mask, batch_size=batch_size)


def evaluate_selection(model: HookedTransformer, task: Task, selected: Sequence[str], queries: Sequence[Example],
                       *, k: int, retrieval: str, seed: int, metric: str, embeddings: EmbeddingCache | None = None,
                       mask=None, batch_size: int = 16, n_prompts: int = 1) -> np.ndarray:
    """Score k-shot prediction on ``queries`` with demonstrations from ``selected`` only.

    With ``"fixed"`` retrieval, ``n_prompts`` prompts of k selected examples
    are drawn with ``seed`` and each query's score is the mean over them. One
    prompt's label order can swing a small model's accuracy widely, so several
    draws separate the selection from the luck of one draw.

    Returns:
        float64 per-query scores, shape (n_queries,).
    """
    by_uid = {example.uid: example for example in task.pool}
    chosen = [by_uid[uid] for uid in selected]
    if k > len(chosen):
        raise ValueError(f"k={k} is larger than the {len(chosen)} selected examples; use k from 1 to {len(chosen)}.")
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be at least 1, got {n_prompts}.")
    if retrieval == "fixed":
        rng = np.random.default_rng(seed)
        query_uids = {query.uid for query in queries}
        if query_uids & set(selected):
            raise ValueError("An evaluation query is also a selected example; keep the pool and eval disjoint.")
        scores = []
        for _ in range(n_prompts):
            demos = [chosen[i] for i in rng.choice(len(chosen), size=k, replace=False)]
            scores.append(_score(model, task, [demos], queries, metric, fixed=True, mask=mask, batch_size=batch_size))
        return np.mean(scores, axis=0)
    if retrieval == "similar":
        if embeddings is None:
            raise ValueError("Similarity retrieval needs an embedding cache.")
        nearest = retrieve_similar(embeddings.get(queries), [query.uid for query in queries],
                                   embeddings.get(chosen), [example.uid for example in chosen], k)
        demos_per_query = [[chosen[i] for i in indices] for indices in nearest]
        return _score(model, task, demos_per_query, queries, metric, fixed=False, mask=mask, batch_size=batch_size)
    raise ValueError(f"Unknown retrieval {retrieval!r}; valid: ('fixed', 'similar').")


@dataclass
class SelectionResults:
    """Per-seed results of ``run_selection`` and their summary.

    Attributes:
        raw: one row per (strategy, budget, seed) with the columns ``RAW_COLUMNS``;
            ``score`` is the mean per-query metric and ``selected`` the picked
            uids as a JSON list.
        metric: the metric scored.
        metadata: JSON-serialisable facts about the run.
    """

    raw: pd.DataFrame
    metric: str
    metadata: dict = field(default_factory=dict)

    def table(self, baseline: str = BASELINE) -> pd.DataFrame:
        """Summarise per strategy and budget: mean, std (ddof=1) and a paired comparison with ``baseline``.

        ``diff_vs_random`` is the mean over seeds of (strategy - baseline) at
        the same budget and seed. ``p_value`` is the paired t-test
        (``scipy.stats.ttest_rel``) on those pairs, and ``p_wilcoxon`` the
        Wilcoxon signed-rank test (``scipy.stats.wilcoxon``). Both are NaN for
        the baseline, for fewer than two pairs, or when every difference is the same (the t statistic
        is then undefined, and scipy would report p = 0 for a constant non-zero difference).
        """
        rows = []
        base = self.raw[self.raw["strategy"] == baseline].set_index(["budget", "seed"])["score"]
        for (strategy, budget), group in self.raw.groupby(["strategy", "budget"], sort=False):
            scores = group.set_index("seed")["score"]
            row = {"strategy": strategy, "budget": int(budget), "mean": scores.mean(),
                   "std": scores.std(ddof=1) if len(scores) > 1 else np.nan, "n_seeds": len(scores),
                   "diff_vs_random": np.nan, "p_value": np.nan, "p_wilcoxon": np.nan}
            if strategy != baseline and len(base):
                paired = [(scores[seed], base[(budget, seed)]) for seed in scores.index if (budget, seed) in base.index]
                if paired:
                    diffs = np.array([a - b for a, b in paired])
                    row["diff_vs_random"] = diffs.mean()
                    if len(diffs) >= 2 and not np.allclose(diffs, diffs[0], rtol=0.0, atol=1e-12):
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)
                            row["p_value"] = stats.ttest_rel([a for a, _ in paired], [b for _, b in paired]).pvalue
                            row["p_wilcoxon"] = stats.wilcoxon(diffs).pvalue
            rows.append(row)
        table = pd.DataFrame(rows)
        return table.sort_values(["budget", "strategy"], kind="stable").reset_index(drop=True)

    def save(self, folder: str | Path) -> None:
        """Write ``raw.parquet``, ``table.csv``, ``metadata.json`` and ``learning_curves.html`` into ``folder``, each atomically."""
        from actsel.selection.curves import learning_curves, save_figure_html

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "raw.parquet") as tmp:
            self.raw.to_parquet(tmp, index=False)
        with atomic_path(folder / "table.csv") as tmp:
            self.table().to_csv(tmp, index=False)
        write_json_atomic(folder / "metadata.json", {"metric": self.metric, "metadata": self.metadata})
        save_figure_html(learning_curves(self), folder / "learning_curves.html")

    @classmethod
    def load(cls, folder: str | Path) -> "SelectionResults":
        folder = Path(folder)
        for name in ("raw.parquet", "metadata.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing; is {folder} a saved SelectionResults folder?")
        side = json.loads((folder / "metadata.json").read_text())
        return cls(pd.read_parquet(folder / "raw.parquet"), side["metric"], side["metadata"])


def _check_run_arguments(task: Task, strategies: list[Strategy], budgets: Sequence[int], seeds: Sequence[int],
                         k: int, rounds: int) -> None:
    n_pool = len(task.pool)
    if not strategies:
        raise ValueError("No strategies given; pass selector names such as ['random', 'fast-votek'].")
    names = [strategy.name for strategy in strategies]
    if len(set(names)) != len(names):
        raise ValueError(f"Strategy names must be unique, got {names}; give repeated selectors distinct labels.")
    if not budgets:
        raise ValueError("No budgets given.")
    for budget in budgets:
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget <= n_pool:
            raise ValueError(f"budget {budget!r} is invalid; budgets must be integers from 1 to {n_pool} "
                             f"(the pool size of task {task.name!r}).")
    if not seeds:
        raise ValueError("No seeds given.")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= min(budgets):
        raise ValueError(f"k={k!r} is invalid; it must be from 1 to the smallest budget, {min(budgets)}.")
    if not isinstance(rounds, (int, np.integer)) or not 1 <= rounds <= min(budgets):
        raise ValueError(f"rounds={rounds!r} is invalid; it must be from 1 to the smallest budget, {min(budgets)}.")


def run_selection(model: HookedTransformer, task: Task, strategies: Sequence[str | Strategy],
                  budgets: Sequence[int], seeds: Sequence[int], k: int = 4, features: FeatureTable | None = None,
                  utility: UtilityResult | None = None, n_eval: int | None = None, rounds: int = 1,
                  progress: bool = True, *, metric: str | None = None, retrieval: str | None = None,
                  embed_fn: EmbeddingFn | None = None, mask=None, batch_size: int = 16,
                  eval_seed: int = 0, n_prompts: int = 1) -> SelectionResults:
    """Run selective annotation and k-shot evaluation for every strategy, budget and seed.

    Args:
        model: the model that predicts (and embeds, unless ``embed_fn`` is given).
        task: its pool is the candidate set and its eval split the queries.
        strategies: selector names or ``Strategy`` objects (options, retrieval, label).
        budgets: annotation budgets, each from 1 to the pool size.
        seeds: one run per seed; the same seeds pair strategies for the tests.
        k: demonstrations per prompt, from 1 to the smallest budget.
        features: activation features for the activation strategies.
        utility: measured utilities for ``oracle``.
        n_eval: evaluate on this many eval queries, drawn once with ``eval_seed``;
            ``None`` for all.
        rounds: selection rounds per budget (the budget is split evenly).
        progress: show a progress bar over runs.
        metric: ``None`` for accuracy (classification) or exact match (generation).
        retrieval: ``"fixed"`` or ``"similar"`` for every strategy, overriding
            each strategy's own setting; ``None`` keeps them.
        embed_fn: embedding function; ``None`` for the model's mean-pooled last layer.
        mask: attention-mask strategy while scoring (``actsel.masks``); ``None`` is causal.
        batch_size: prompts per forward pass.
        eval_seed: seed for drawing the ``n_eval`` queries.
        n_prompts: prompts drawn per run for ``"fixed"`` retrieval, scores averaged.

    Returns:
        ``SelectionResults`` with one raw row per (strategy, budget, seed).
    """
    from actsel.utility.metrics import check_metric

    strategies = [as_strategy(spec) for spec in strategies]
    if retrieval is not None:
        strategies = [Strategy(s.selector, dict(s.params), retrieval, s.label) for s in strategies]
    budgets = list(budgets)
    _check_run_arguments(task, strategies, budgets, list(seeds), k, rounds)
    budgets = [int(budget) for budget in budgets]
    metric = metric or default_selection_metric(task)
    check_metric(task, metric)
    queries = task.subsample(n_eval=n_eval, seed=eval_seed).eval if n_eval is not None else list(task.eval)

    cache = EmbeddingCache(embed_fn or default_embedding_fn(model, task, batch_size=batch_size))
    base_context = SelectionContext(model, task, features, utility, embed_fn, [], k, batch_size, False, cache)
    runs = [(strategy, budget, seed) for seed in seeds for budget in budgets for strategy in strategies]
    rows = []
    started = time.perf_counter()
    for strategy, budget, seed in tqdm(runs, desc="selection runs", disable=not progress):
        t0 = time.perf_counter()
        selected: list[str] = []
        for chunk in np.array_split(np.arange(budget), rounds):
            context = base_context.with_selected(selected)
            selected += select(strategy.selector, context, len(chunk), seed, **strategy.params)
        t1 = time.perf_counter()
        scores = evaluate_selection(model, task, selected, queries, k=k, retrieval=strategy.resolved_retrieval,
                                    seed=seed, metric=metric, embeddings=cache, mask=mask, batch_size=batch_size,
                                    n_prompts=n_prompts)
        t2 = time.perf_counter()
        rows.append({"strategy": strategy.name, "selector": strategy.selector,
                     "retrieval": strategy.resolved_retrieval, "budget": budget, "seed": int(seed),
                     "score": float(np.mean(scores)), "metric": metric, "n_eval": len(queries), "rounds": rounds,
                     "selected": json.dumps(selected), "select_seconds": t1 - t0, "eval_seconds": t2 - t1})
        logger.info("%s budget=%d seed=%d: %s=%.4f (select %.1fs, eval %.1fs)", strategy.name, budget, seed,
                    metric, rows[-1]["score"], t1 - t0, t2 - t1)
    metadata = {"task": task.name, "n_pool": len(task.pool), "n_eval": len(queries), "k": k, "rounds": rounds,
                "n_prompts": n_prompts,
                "budgets": budgets, "seeds": [int(seed) for seed in seeds], "eval_seed": eval_seed,
                "mask": mask if isinstance(mask, str) or mask is None else repr(mask),
                "strategies": [{"name": s.name, "selector": s.selector, "params": s.params,
                                "retrieval": s.resolved_retrieval} for s in strategies],
                "model": getattr(model.cfg, "model_name", None), "seconds": time.perf_counter() - started}
    return SelectionResults(pd.DataFrame(rows, columns=list(RAW_COLUMNS)), metric, metadata)
