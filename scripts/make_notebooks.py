"""Write the notebooks under notebooks/ (without outputs) from the cell sources below.

Each notebook reads ACTSEL_NOTEBOOK_SMALL=1, which the test run sets, to use
small sizes; without it the sizes are those a researcher would start with.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SETUP = '''import os
import logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = os.environ.get("ACTSEL_NOTEBOOK_SMALL") == "1"
logging.basicConfig(level=logging.WARNING)

import actsel'''

TASK = '''from actsel.tasks.builtin import resolve_data_dir

try:
    data_dir = resolve_data_dir(None)
    task_name = "sst2"
except FileNotFoundError:
    data_dir, task_name = None, "demo"   # no data folder: fall back to the shipped demo task
task = actsel.load_task(task_name, data_dir=data_dir)
task = task.subsample(n_pool=16 if SMALL else 200, n_eval=8 if SMALL else 100, seed=0)
print(task.name, len(task.pool), "candidates,", len(task.eval), "evaluation queries")'''

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        new_markdown_cell("# Quickstart: the bundled model, massive activations and per-layer moments\n\n"
                          "Loads SmolLM2-135M-Instruct offline as a `HookedTransformer`, finds its massive "
                          "activations and plots the moments of its MLP outputs layer by layer."),
        new_code_cell(SETUP),
        new_code_cell('model = actsel.load_model()   # converted once, cached afterwards\n'
                      'print(model.cfg.model_name, model.cfg.n_layers, "layers, d_model", model.cfg.d_model)'),
        new_markdown_cell("## A prompt and its segment map"),
        new_code_cell('task = actsel.load_task("demo")\n'
                      'builder = actsel.PromptBuilder(task, model.tokenizer)\n'
                      'prompt = builder.build(task.pool[:2], task.eval[0])\n'
                      'for segment in prompt.segments:\n'
                      '    print(f"{segment.role:12s} demo={segment.demo} tokens {segment.start}-{segment.end}: {segment.text!r}")'),
        new_markdown_cell("## Massive activations\n\nValues above 100 and at least 1000 times the layer's "
                          "median |activation| in the residual stream."),
        new_code_cell('from actsel.activations import find_massive_activations\n'
                      'from actsel.analysis import massive_activation_map\n\n'
                      'prompts = [builder.build([example]) for example in task.pool[: 2 if SMALL else 8]]\n'
                      'massive = find_massive_activations(model, prompts, hook="hook_resid_post")\n'
                      'print(massive.groupby(["position", "dimension"]).size().sort_values(ascending=False).head())\n'
                      'massive_activation_map(massive)'),
        new_markdown_cell("## Moments per layer"),
        new_code_cell('from actsel.activations import extract_features\n'
                      'from actsel.analysis import moment_distributions\n\n'
                      'features = extract_features(model, task, task.pool[: 6 if SMALL else 24],\n'
                      '                            hooks=["hook_mlp_out", "hook_resid_post"], progress=not SMALL)\n'
                      'print(features.n_examples, "examples x", features.n_features, "features")\n'
                      'moment_distributions(features, statistic="kurtosis", hook="hook_resid_post")'),
    ],
    "02_correlation_heatmaps.ipynb": [
        new_markdown_cell("# Correlation heatmaps on a real task\n\nActivation statistics of each candidate "
                          "against its one-shot utility, Spearman's rho per layer, with the utility's "
                          "split-half reliability for scale."),
        new_code_cell(SETUP),
        new_code_cell('model = actsel.load_model()\n' + TASK),
        new_code_cell('from actsel.activations import extract_features\n'
                      'from actsel.utility import estimate_utility\n\n'
                      'features = extract_features(model, task, hooks=["hook_mlp_out", "hook_resid_post"],\n'
                      '                            layers=[0, 15, 29] if SMALL else None, masks=["causal", "sink_free"],\n'
                      '                            progress=not SMALL)\n'
                      'utility = estimate_utility(model, task, "one_shot", progress=not SMALL)\n'
                      'print(utility.to_frame().describe())'),
        new_code_cell('from actsel.analysis import correlate, correlation_heatmap, max_abs_rho_summary, split_half_reliability\n\n'
                      'correlations = correlate(features, utility, n_bootstrap=100 if SMALL else 1000)\n'
                      'print(split_half_reliability(utility))\n'
                      'max_abs_rho_summary(correlations)'),
        new_code_cell('correlation_heatmap(correlations, facet="mask")'),
    ],
    "03_active_learning.ipynb": [
        new_markdown_cell("# Active-learning curves\n\nSelective annotation with several strategies and budgets, "
                          "then k-shot evaluation; the curves show the mean and one standard deviation over seeds."),
        new_code_cell(SETUP),
        new_code_cell('model = actsel.load_model()\n' + TASK),
        new_code_cell('from actsel.selection import learning_curves, run_selection\n\n'
                      'strategies = ["random", "fast-votek", "kate"] if SMALL else ["random", "kate", "uncertainty", "votek", "fast-votek"]\n'
                      'results = run_selection(model, task, strategies, budgets=[4] if SMALL else [8, 16, 32],\n'
                      '                        seeds=[0] if SMALL else [0, 1, 2], k=4, progress=not SMALL)\n'
                      'results.table()'),
        new_code_cell('learning_curves(results)'),
    ],
    "04_sae_hooks.ipynb": [
        new_markdown_cell("# Sparse Autoencoders as a lens\n\nTrains a small SAE on the residual stream of one "
                          "layer with SAE-Lens, then computes SAE latent statistics per example in the same "
                          "feature table the raw statistics use."),
        new_code_cell(SETUP),
        new_code_cell('model = actsel.load_model()\n' + TASK),
        new_code_cell('from actsel.sae.train import train_sae\n\n'
                      'sae, metrics = train_sae(model, task, hook="blocks.15.hook_resid_post", d_sae=256 if SMALL else 2048,\n'
                      '                         training_tokens=4_096 if SMALL else 200_000, overwrite=True)\n'
                      'metrics'),
        new_code_cell('from actsel.sae import extract_sae_features\n\n'
                      'sae_features = extract_sae_features(model, task, sae, progress=not SMALL)\n'
                      'sae_features.to_frame().describe().T.head(12)'),
    ],
}


def main() -> None:
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    folder.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        notebook = new_notebook(cells=cells)
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(notebook, folder / name)


if __name__ == "__main__":
    main()
