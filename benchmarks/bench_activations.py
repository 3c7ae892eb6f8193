"""Benchmark activation statistics: throughput against a plain HF forward, and peak memory against run_with_cache.

Throughput (one process): ``extract_features`` with every statistic, all 30
layers and two hooks (``hook_mlp_out``, ``hook_resid_post``) on
SmolLM2-135M, against ``LlamaForCausalLM`` loaded by ``transformers`` from the
same GGUF file, on the same right-padded batches (16 prompts of at most 64
tokens: BOS and one SST-2 demonstration each). Both run in float32 on the CPU
with the same thread count. The ratio is HF time / extraction time, so above
1.0 means extraction is faster; it is reported for the best times and as the
median of the per-repeat ratios. Extraction is timed twice: with the default
span (``example``) and with all four spans (``example``, ``input``, ``label``,
``last``), which needs four medians per hook instead of one.

Memory: for pools of growing size, the peak resident set size (sampled every
5 ms) of a fresh child process above its level after model load and one
warm-up batch of each path, for ``extract_features`` against
``run_with_cache`` keeping the same activations.
To stay short on a shared machine it uses short real SST-2 sentences and only
the first ``--memory-layers`` layers.

Usage: ``python benchmarks/bench_activations.py [--batches 3] [--sizes 200,1000,2000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import threading
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402

from actsel import load_model, load_task  # noqa: E402
from actsel.activations import SPANS, extract_features  # noqa: E402
from actsel.activations.extract import build_candidate_prompts  # noqa: E402
from actsel.prompts import PromptBuilder, batches_by_length, collate  # noqa: E402

HOOKS = ("hook_mlp_out", "hook_resid_post")


class PeakRss:
    """Sample this process's resident set size every ``interval`` seconds in a thread and keep the maximum.

    ``ru_maxrss`` cannot be used here because model loading sets a higher
    watermark than the runs being measured.
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.process = psutil.Process()
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _throughput_examples(model, task, n_examples: int, max_tokens: int):
    """Pick pool examples whose prompt fits in ``max_tokens``, longest first, so batches are nearly full."""
    builder = PromptBuilder(task, model.tokenizer)
    candidates = task.pool[: 20 * n_examples]
    prompts = build_candidate_prompts(builder, task, candidates, "alone", 0, 0)
    fitting = [(len(p), e) for p, e in zip(prompts, candidates) if len(p) <= max_tokens]
    fitting.sort(key=lambda pair: -pair[0])
    return [example for _, example in fitting[:n_examples]]


def run_throughput(args) -> dict:
    from transformers import AutoModelForCausalLM

    from actsel.models.loading import bundled_gguf_path

    task = load_task("sst2")
    model = load_model("smollm2-135m", device="cpu", dtype="float32")
    gguf = bundled_gguf_path()
    started = time.perf_counter()
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    hf_load_s = time.perf_counter() - started

    n_examples = args.batches * args.batch_size
    examples = _throughput_examples(model, task, n_examples, args.max_tokens)
    builder = PromptBuilder(task, model.tokenizer)
    prompts = build_candidate_prompts(builder, task, examples, "alone", 0, args.seed)
    batches = [collate([prompts[i] for i in indices], model.tokenizer.pad_token_id)
               for indices in batches_by_length(prompts, args.batch_size)]
    tokens = sum(batch.tokens.numel() for batch in batches)

    def extraction(spans):
        extract_features(model, task, examples, hooks=HOOKS, masks=("causal",), spans=spans, context="alone",
                         batch_size=args.batch_size, progress=False)

    def hf_forward():
        with torch.no_grad():
            for batch in batches:
                hf_model(input_ids=batch.tokens, attention_mask=batch.attention_mask)

    def tl_forward():
        with torch.no_grad():
            for batch in batches:
                model(batch.tokens, attention_mask=batch.attention_mask)

    # Warm up each path on the first batch, then alternate timed repeats.
    with torch.no_grad():
        hf_model(input_ids=batches[0].tokens, attention_mask=batches[0].attention_mask)
        model(batches[0].tokens, attention_mask=batches[0].attention_mask, return_type=None)
    paths = {
        "extract_example_span": lambda: extraction(("example",)),
        "extract_all_spans": lambda: extraction(SPANS),
        "hf_forward": hf_forward,
        "tl_forward": tl_forward,
    }
    timings = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, function in paths.items():
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    best = {name: min(values) for name, values in timings.items()}
    return {
        "batches": len(batches), "batch_shapes": [list(batch.tokens.shape) for batch in batches],
        "tokens_including_padding": tokens, "threads": torch.get_num_threads(), "hf_load_s": round(hf_load_s, 1),
        "seconds": {name: [round(v, 2) for v in values] for name, values in timings.items()},
        "tokens_per_s": {name: round(tokens / seconds, 1) for name, seconds in best.items()},
        "ratio_hf_over_extract_example_span": round(best["hf_forward"] / best["extract_example_span"], 3),
        "ratio_hf_over_extract_all_spans": round(best["hf_forward"] / best["extract_all_spans"], 3),
        "ratio_tl_over_extract_all_spans": round(best["tl_forward"] / best["extract_all_spans"], 3),
        # Ratios within each repeat, whose paths ran back to back, are less exposed to slow phases of a shared
        # machine than ratios of best times taken from different repeats.
        "median_paired_ratio_example_span": _median_ratio(timings["hf_forward"], timings["extract_example_span"]),
        "median_paired_ratio_all_spans": _median_ratio(timings["hf_forward"], timings["extract_all_spans"]),
    }


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(numerators, denominators)), 3)


def memory_child(mode: str, size: int, n_layers: int) -> None:
    """Print the peak RSS growth of one ``mode`` run over ``size`` examples (runs in a fresh process)."""
    task = load_task("sst2")
    model = load_model("smollm2-135m", device="cpu", dtype="float32")
    builder = PromptBuilder(task, model.tokenizer)
    by_length = sorted(task.pool, key=lambda example: len(example.fields["text"]))
    examples = by_length[:size]
    layers = list(range(n_layers))
    names = [f"blocks.{layer}.{hook}" for layer in layers for hook in HOOKS]
    prompts = [builder.build([example]) for example in examples]
    # One warm-up batch of each path before the baseline, so allocator pools exist and the compiled
    # statistics kernel is loaded (Numba and its cached machine code add tens of MiB once per process).
    extract_features(model, task, examples[:16], hooks=HOOKS, layers=layers, spans=SPANS, progress=False)
    with torch.no_grad():
        warm = collate(prompts[:16], model.tokenizer.pad_token_id)
        model(warm.tokens, attention_mask=warm.attention_mask, return_type=None, stop_at_layer=n_layers)
    baseline = psutil.Process().memory_info().rss
    started = time.perf_counter()
    monitor = PeakRss().__enter__()
    if mode == "extract":
        table = extract_features(model, task, examples, hooks=HOOKS, layers=layers, spans=SPANS, batch_size=16,
                                 progress=False)
        kept_mib = table.values.nbytes / 2**20
    else:
        kept = []
        for indices in batches_by_length(prompts, 16):
            batch = collate([prompts[i] for i in indices], model.tokenizer.pad_token_id)
            _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=names,
                                            stop_at_layer=n_layers, return_type=None)
            for row, length in enumerate(batch.lengths):
                kept.append({name: cache[name][row, :length].clone() for name in names})
        kept_mib = sum(t.numel() * t.element_size() for entry in kept for t in entry.values()) / 2**20
    monitor.__exit__(None, None, None)
    print(json.dumps({"mode": mode, "size": size, "peak_rss_growth_mib": round((monitor.peak - baseline) / 2**20, 1),
                      "kept_mib": round(kept_mib, 2), "seconds": round(time.perf_counter() - started, 1),
                      "tokens": int(sum(len(p) for p in prompts))}))


def run_memory(args) -> list[dict]:
    results = []
    for size in args.sizes:
        for mode in ("extract", "cache"):
            command = [sys.executable, __file__, "--memory-child", mode, str(size), "--memory-layers",
                       str(args.memory_layers), "--threads", str(args.threads)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches of prompts per path")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    parser.add_argument("--max-tokens", type=int, default=64, help="maximum prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the fastest counts")
    parser.add_argument("--sizes", type=lambda text: [int(s) for s in text.split(",")], default=[200, 1000, 2000],
                        help="pool sizes for the memory runs, comma-separated")
    parser.add_argument("--memory-layers", type=int, default=2, help="layers hooked in the memory runs")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.memory_layers)
        return
    if not args.skip_throughput:
        print(json.dumps({"throughput": run_throughput(args)}, indent=1), flush=True)
    if not args.skip_memory:
        run_memory(args)


if __name__ == "__main__":
    main()
