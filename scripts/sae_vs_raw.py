"""Compare SAE latent statistics with raw activation statistics on a finished run.

Reads the candidates, the raw feature table and the utility of an ``actsel run``
folder, computes SAE features of the same candidates under the same mask and
span, correlates both lenses with the same utility (``actsel.analysis.correlate``)
and prints the largest |rho| of each lens: over all candidates and within each
label (a feature that only tracks the label cannot reach a high |rho| there).

Usage:
    python scripts/sae_vs_raw.py --run runs/sst2-200x100 --sae PATH/TO/SAE_FOLDER

The raw lens is the run's features at the SAE's hook (for example
``blocks.15.hook_resid_post``), and, for reference, at every hook and layer of
the run. Writes ``sae_correlations.csv`` and ``sae_vs_raw.csv`` into the run folder.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402

from actsel.analysis import correlate  # noqa: E402
from actsel.io import atomic_path  # noqa: E402
from actsel.pipeline.config import config_from_dict, read_config_file  # noqa: E402
from actsel.pipeline.stages import Run, with_output  # noqa: E402
from actsel.sae import extract_sae_features, load_sae  # noqa: E402
from actsel.sae.attach import sae_hook_name  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="folder of a finished actsel run (features and utility)")
    parser.add_argument("--sae", required=True, help="SAE folder written by SAE-Lens (cfg.json + weights)")
    parser.add_argument("--mask", default="causal", help="mask of the raw features to compare with")
    parser.add_argument("--span", default="example", help="span of both lenses")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    return parser.parse_args()


def best_row(correlations: pd.DataFrame, lens: str, subset: str) -> dict:
    """Summarise the feature with the largest |rho| in ``correlations`` as one row."""
    finite = correlations.dropna(subset=["rho"])
    best = finite.loc[finite["rho"].abs().idxmax()]
    return {
        "lens": lens, "candidates": subset, "n": int(best["n"]), "features": len(correlations),
        "finite": len(finite), "max_abs_rho": abs(best["rho"]), "rho": best["rho"],
        "feature": f"{best['hook']} {best['statistic']}", "ci_low": best["ci_low"], "ci_high": best["ci_high"],
        "q_value": best["q_value"], "n_q_below_0.05": int((correlations["q_value"] < 0.05).sum()),
    }


def main() -> None:
    args = parse_args()
    folder = Path(args.run)
    run = Run(with_output(config_from_dict(read_config_file(folder / "config.toml")), str(folder)))
    features, utility = run.load_features(), run.load_utility()
    sae = load_sae(args.sae)
    hook = sae_hook_name(sae)
    if hook is None:
        raise SystemExit(f"The SAE in {args.sae} records no hook point; this script needs one from its cfg.json.")

    started = time.perf_counter()
    wanted = set(features.uids)
    examples = [example for example in run.task.pool if example.uid in wanted]
    sae_table = extract_sae_features(run.model, run.task, sae, examples, mask=args.mask, spans=(args.span,))
    print(f"SAE features of {len(examples)} candidates in {time.perf_counter() - started:.0f} s")
    # Latent indices are category codes; a rank correlation over them means nothing.
    sae_table = sae_table.select(statistic=[s for s in sae_table.columns["statistic"].unique()
                                            if not s.startswith("top_latent")])
    lenses = {
        f"SAE latents at {hook}": sae_table,
        f"raw, {hook}": features.select(hook=hook, mask=args.mask, span=args.span),
        "raw, every hook and layer": features.select(mask=args.mask, span=args.span),
    }
    label_of = dict(zip(features.uids, features.labels))
    subsets = {"all": features.uids}
    for label in sorted(set(features.labels)):
        subsets[f"label {label}"] = [uid for uid in features.uids if label_of[uid] == label]

    rows, grids = [], []
    for lens, table in lenses.items():
        for subset, uids in subsets.items():
            correlations = correlate(table.take(uids), utility, n_bootstrap=args.n_bootstrap, seed=0)
            rows.append(best_row(correlations, lens, subset))
            if lens.startswith("SAE") and subset == "all":
                grids.append(correlations)
    summary = pd.DataFrame(rows)
    with atomic_path(folder / "sae_vs_raw.csv") as tmp:
        summary.to_csv(tmp, index=False)
    with atomic_path(folder / "sae_correlations.csv") as tmp:
        pd.concat(grids).to_csv(tmp, index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        print(summary.to_string(index=False))


if __name__ == "__main__":
    main()
