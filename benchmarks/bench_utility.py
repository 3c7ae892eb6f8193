"""Benchmark one-shot utility scoring: prefix caching vs unbatched vs batched full recomputation.

Usage:
    python benchmarks/bench_utility.py speed --n-candidates 8 --n-queries 32 --prefix-tokens 60
    python benchmarks/bench_utility.py gain --n-candidates 20 --n-queries 50

``speed`` scores N SST-2 candidates as the only demonstration on M evaluation
queries three ways in one process and prints the wall times, their ratios and
the largest score difference between the methods:

- cached: ``score_with_prefix`` per candidate (prefix run once, queries batched
  through its key-value cache);
- unbatched: ``score_prompts`` with batch size 1 (every prompt run alone);
- batched: one ``score_prompts`` call over all N x M prompts, grouped by length.

Each method runs ``--repeats`` times, interleaved, and the fastest run counts.
``--prefix-tokens`` picks candidates by prefix length instead of the first N.

``gain`` runs ``estimate_utility(..., "one_shot")`` and prints the time, the
zero-shot score, the spread of the utilities and the split-half correlation.
Ratios are only comparable within one run, because the absolute times depend on
the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from scipy import stats

from actsel import load_model, load_task
from actsel.prompts import PromptBuilder
from actsel.utility import estimate_utility, score_prompts, score_with_prefix


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["speed", "gain"], help="what to measure")
    parser.add_argument("--model", default="smollm2-135m", help="model spec for actsel.load_model")
    parser.add_argument("--task", default="sst2", help="task name for actsel.load_task")
    parser.add_argument("--n-candidates", type=int, default=8, help="candidates drawn from the pool")
    parser.add_argument("--n-queries", type=int, default=32, help="queries drawn from the eval split")
    parser.add_argument("--metric", default="label_logprob", help="per-query metric")
    parser.add_argument("--batch-size", type=int, default=32, help="queries (or prompts) per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the example draw")
    parser.add_argument("--repeats", type=int, default=2, help="speed: interleaved repeats; the fastest counts")
    parser.add_argument("--prefix-tokens", type=int, default=None,
                        help="speed: take the candidates whose one-shot prefix is closest to this many tokens "
                             "(default: the first N of the pool)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args()


def _candidates_near(task, builder, queries, n: int, prefix_tokens: int | None):
    """Return the first ``n`` pool examples, or the ``n`` whose one-shot prefix is closest to ``prefix_tokens``."""
    if prefix_tokens is None:
        return list(task.pool[:n])
    lengths = [builder.build([c], queries[0]).span("query_input")[0] for c in task.pool]
    order = np.argsort([abs(length - prefix_tokens) for length in lengths], kind="stable")
    return [task.pool[i] for i in order[:n]]


def run_speed(model, task, args) -> dict:
    queries = task.eval
    builder = PromptBuilder(task, model.tokenizer)
    candidates = _candidates_near(task, builder, queries, args.n_candidates, args.prefix_tokens)
    prefix_lengths = [builder.build([c], queries[0]).span("query_input")[0] for c in candidates]
    query_lengths = [len(builder.build([], q)) - 1 for q in queries]
    demos = [[c] for c in candidates for _ in queries]
    flat_queries = [q for _ in candidates for q in queries]

    def cached():
        return np.stack([score_with_prefix(model, task, [c], queries, args.metric, batch_size=args.batch_size)
                         for c in candidates]).ravel()

    def batched():
        return score_prompts(model, task, demos, flat_queries, args.metric, batch_size=args.batch_size)

    def unbatched():
        return score_prompts(model, task, demos, flat_queries, args.metric, batch_size=1)

    score_with_prefix(model, task, candidates[:1], queries[:2], args.metric)  # warm-up
    paths = {"cached": cached, "batched": batched, "unbatched": unbatched}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    scores = {}
    for _ in range(args.repeats):  # interleaved, so a change in load affects every path alike
        for name, function in paths.items():
            start = time.perf_counter()
            scores[name] = function()
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in seconds.items()}
    pairs = len(candidates) * len(queries)
    return {
        "n_candidates": len(candidates), "n_queries": len(queries), "repeats": args.repeats,
        "mean_prefix_tokens": float(np.mean(prefix_lengths)), "mean_query_tokens": float(np.mean(query_lengths)),
        "seconds": {name: [round(v, 2) for v in values] for name, values in seconds.items()},
        "speedup_vs_unbatched": best["unbatched"] / best["cached"],
        "speedup_vs_batched": best["batched"] / best["cached"],
        "ms_per_pair_cached": 1000 * best["cached"] / pairs,
        "max_abs_diff_vs_unbatched": float(np.abs(scores["cached"] - scores["unbatched"]).max()),
        "max_abs_diff_vs_batched": float(np.abs(scores["cached"] - scores["batched"]).max()),
    }


def run_gain(model, task, args) -> dict:
    result = estimate_utility(model, task, "one_shot", metric=args.metric, seed=args.seed,
                              batch_size=args.batch_size, progress=True)
    pairs = (len(task.pool) + 1) * len(task.eval)  # the zero-shot pass counts as one more candidate
    return {
        "n_candidates": len(task.pool), "n_queries": len(task.eval), "metric": args.metric,
        "seconds": result.metadata["seconds"], "ms_per_pair": 1000 * result.metadata["seconds"] / pairs,
        "zero_shot_mean": result.metadata["zero_shot_mean"],
        "utility_min": float(result.value.min()), "utility_median": float(np.median(result.value)),
        "utility_max": float(result.value.max()), "utility_std": float(result.value.std(ddof=1)),
        "median_stderr": float(np.median(result.stderr)),
        "split_half_pearson": float(stats.pearsonr(result.halves[0], result.halves[1])[0]),
        "split_half_spearman": float(stats.spearmanr(result.halves[0], result.halves[1])[0]),
    }


def main() -> None:
    args = parse_args()
    model = load_model(args.model, device="cpu", dtype="float32")
    task = load_task(args.task)
    if args.mode == "speed" and args.prefix_tokens is not None:
        task = task.subsample(min(len(task.pool), 50 * args.n_candidates), args.n_queries, seed=args.seed)
    else:
        task = task.subsample(args.n_candidates, args.n_queries, seed=args.seed)
    results = run_speed(model, task, args) if args.mode == "speed" else run_gain(model, task, args)
    results.update({"mode": args.mode, "model": args.model, "task": args.task, "metric": args.metric,
                    "torch_threads": os.environ.get("OMP_NUM_THREADS", "default")})
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
