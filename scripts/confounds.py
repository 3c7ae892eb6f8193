"""Check how much of a finished run's correlations the label and the length of a demonstration explain.

Reads the feature table, the utility and the candidates of an ``actsel run``
folder and prints:

- Spearman's rho of utility with the demonstration's token length, and a
  Kruskal-Wallis test of utility across labels;
- the largest |rho| of any feature with utility (as in ``max_abs_rho.csv``);
- the largest |rho| of any feature with the utility left after label and
  length: the residual of a least-squares fit of the utility's ranks on label
  indicators and the length's rank. Only the utility is adjusted (a
  semi-partial correlation), so a feature that tracks label or length gets no
  credit for it;
- the largest |rho| within each label that has at least ``--min-label-size``
  candidates.

For a generation task the label is the answer text, so only length is
adjusted for and no within-label comparison is made.

Each |rho| comes with its Benjamini-Hochberg q-value over all features of
that comparison and the number of features with q < 0.05. Writes
``confounds.csv`` into the run folder.

Usage:
    python scripts/confounds.py --run runs/sst2-200x100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from actsel.analysis import correlate  # noqa: E402
from actsel.io import atomic_path  # noqa: E402
from actsel.pipeline.config import config_from_dict, read_config_file  # noqa: E402
from actsel.pipeline.stages import Run, with_output  # noqa: E402
from actsel.prompts import PromptBuilder  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="folder of a finished actsel run (features and utility)")
    parser.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--min-label-size", type=int, default=10,
                        help="skip the within-label comparison of labels with fewer candidates")
    return parser.parse_args()


def residual_ranks(utility: np.ndarray, labels: list[str], lengths: np.ndarray) -> np.ndarray:
    """Return the utility's ranks minus their least-squares fit on label indicators and length rank."""
    names = sorted(set(labels))
    design = [np.ones(len(utility)), stats.rankdata(lengths)]
    design += [np.array([label == name for label in labels], dtype=float) for name in names[1:]]
    design = np.column_stack(design)
    ranks = stats.rankdata(utility)
    coefficients, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    return ranks - design @ coefficients


def summary_row(correlations: pd.DataFrame, comparison: str) -> dict:
    """Summarise the feature with the largest |rho| of one comparison."""
    finite = correlations.dropna(subset=["rho"])
    if finite.empty:
        return {"comparison": comparison, "n": 0, "max_abs_rho": np.nan}
    best = finite.loc[finite["rho"].abs().idxmax()]
    return {
        "comparison": comparison, "n": int(best["n"]), "max_abs_rho": abs(best["rho"]), "rho": best["rho"],
        "feature": f"{best['mask']} {best['hook']} {best['statistic']}",
        "ci_low": best["ci_low"], "ci_high": best["ci_high"], "q_value": best["q_value"],
        "n_q_below_0.05": int((correlations["q_value"] < 0.05).sum()),
    }


def main() -> None:
    args = parse_args()
    folder = Path(args.run)
    run = Run(with_output(config_from_dict(read_config_file(folder / "config.toml")), str(folder)), progress=False)
    features, utility = run.load_features(), run.load_utility()
    value_of = dict(zip(utility.uids, utility.value))
    keep = [uid for uid in features.uids if uid in value_of]
    features = features.take(keep)
    values = np.array([value_of[uid] for uid in keep])
    # A generation task's "label" is its answer text, nearly one per candidate, so only length is adjusted for.
    classification = run.task.kind == "classification"
    labels = list(features.labels) if classification else ["answer"] * len(keep)

    builder = PromptBuilder(run.task, run.model.tokenizer)
    example_of = {example.uid: example for example in run.task.pool}
    lengths = np.array([len(builder.build([example_of[uid]])) - 1 for uid in keep])  # without BOS

    length_rho, length_p = stats.spearmanr(lengths, values)
    groups = [values[[label == name for label in labels]] for name in sorted(set(labels))]
    print(f"{len(keep)} candidates; utility vs token length: rho = {length_rho:.3f} (p = {length_p:.2g})")
    if len(groups) > 1:
        print(f"utility across labels: Kruskal-Wallis p = {stats.kruskal(*groups).pvalue:.2g}")
        for name, group in zip(sorted(set(labels)), groups):
            print(f"  label {name}: n = {len(group)}, mean utility {group.mean():.4f}")

    adjusted = "after label and length" if classification else "after length"
    comparisons = {
        "all candidates": (features, values),
        adjusted: (features, residual_ranks(values, labels, lengths)),
    }
    for name in sorted(set(labels)) if classification else []:
        rows = [i for i, label in enumerate(labels) if label == name]
        if len(rows) < args.min_label_size:
            print(f"  label {name}: {len(rows)} candidates, fewer than --min-label-size; not compared")
            continue
        comparisons[f"within label {name}"] = (features.take([keep[i] for i in rows]), values[rows])
    table = pd.DataFrame([
        summary_row(correlate(subset, target, n_bootstrap=args.n_bootstrap, seed=0), comparison)
        for comparison, (subset, target) in comparisons.items()
    ])
    with atomic_path(folder / "confounds.csv") as tmp:
        table.to_csv(tmp, index=False)
    with pd.option_context("display.width", 220, "display.max_columns", 20, "display.precision", 3):
        print(table.to_string(index=False))


if __name__ == "__main__":
    main()
