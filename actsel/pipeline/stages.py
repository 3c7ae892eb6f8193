"""The pipeline's stages (extract, utility, correlate, select, report) on one output folder.

``Run`` loads the model and task lazily, runs each stage through its cache (see
``actsel.pipeline.cache``) and writes the stage's results into the output folder:

- ``config.toml`` and ``versions.json``: what was run, with which packages;
- ``features.parquet`` (+ ``.json``): the feature table;
- ``utility.parquet`` (+ ``.json``): utility per candidate;
- ``correlations.csv``, ``max_abs_rho.csv``, ``reliability.json``;
- ``selection.csv`` and ``selection_raw.csv``;
- ``figures/*.html`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import platform
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from actsel.activations.table import FeatureTable
from actsel.io import atomic_path, write_json_atomic, write_text_atomic
from actsel.pipeline.cache import chunked, run_chunks, stage_key, task_fingerprint
from actsel.pipeline.config import RunConfig, dump_toml
from actsel.utility.result import UtilityResult

logger = logging.getLogger(__name__)

PACKAGES = ("actsel", "torch", "transformer-lens", "transformers", "numpy", "scipy", "pandas", "plotly", "datasets", "sae-lens")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class StageInputMissing(RuntimeError):
    """A stage needs the output of an earlier stage that has not been run."""


class Run:
    """One configured run writing into ``config.output``."""

    def __init__(self, config: RunConfig, *, progress: bool = True) -> None:
        self.config = config
        self.output = Path(config.output)
        self.progress = progress

    # Inputs ---------------------------------------------------------------

    @cached_property
    def task(self):
        from actsel.tasks import load_task, load_task_from_files

        cfg = self.config.task
        if cfg.name:
            task = load_task(cfg.name, data_dir=cfg.data_dir)
        else:
            sources = cfg.files or [cfg.hub]
            task = load_task_from_files(
                sources[0],
                sources[1] if len(sources) > 1 else None,
                kind=cfg.kind,
                text_columns=cfg.text_columns,
                label_column=cfg.label_column,
                input_template=cfg.template,
                seed=cfg.seed,
            )
        task = task.subsample(cfg.n_pool, cfg.n_eval, seed=cfg.seed)
        logger.info("Task %s: %d pool and %d evaluation examples", task.name, len(task.pool), len(task.eval))
        return task

    @cached_property
    def model(self):
        from actsel.models import load_model

        cfg = self.config.model
        return load_model(cfg.spec, device=cfg.device, dtype=cfg.dtype)

    def _key(self, *sections: str) -> str:
        import actsel

        return stage_key(actsel.__version__, task_fingerprint(self.task), self.config.section_key("model", *sections))

    def _cache_dir(self, stage: str, *sections: str) -> Path:
        return self.output / "cache" / f"{stage}-{self._key(*sections)}"

    def write_manifest(self) -> None:
        write_text_atomic(self.output / "config.toml", dump_toml(self.config))
        write_json_atomic(self.output / "versions.json", package_versions())

    # Stages ---------------------------------------------------------------

    def extract(self) -> FeatureTable:
        """Activation statistics for every pool example, in chunks of ``features.chunk_size``."""
        from actsel.activations import extract_features

        cfg = self.config.features
        folder = self._cache_dir("features", "features")
        pool = list(self.task.pool)

        def compute(chunk):
            return extract_features(
                self.model, self.task, list(chunk),
                hooks=cfg.hooks, layers=cfg.layers, masks=cfg.masks, spans=cfg.spans, context=cfg.context,
                n_context=cfg.n_context, skip_first_token=cfg.skip_first_token, batch_size=cfg.batch_size,
                seed=self.config.seed, progress=False,
            )

        parts = run_chunks(folder, chunked(pool, cfg.chunk_size), compute,
                           save=lambda table, path: table.save(path), load=FeatureTable.load,
                           description="Activation statistics", progress=self.progress)
        table = FeatureTable.concat_rows(parts)
        table.save(self.output / "features.parquet")
        return table

    def utility(self) -> UtilityResult:
        """Utility of every pool example; one-shot gain runs in chunks of candidates."""
        from actsel.utility import estimate_utility

        cfg = self.config.utility
        folder = self._cache_dir("utility", "utility")
        pool = list(self.task.pool)

        def compute(chunk):
            return estimate_utility(
                self.model, self.task, cfg.estimator, metric=cfg.metric, candidates=list(chunk),
                queries=list(self.task.eval), mask=None if cfg.mask == "causal" else cfg.mask,
                seed=self.config.seed, n_prompts=cfg.n_prompts, k=cfg.k, label_balanced=cfg.label_balanced,
                batch_size=cfg.batch_size, progress=False,
            )

        # Conditional accuracy and influence share one set of sampled prompts
        # across candidates, so they cannot be split by candidate.
        chunks = chunked(pool, cfg.chunk_size) if cfg.estimator == "one_shot" else [pool]
        parts = run_chunks(folder, chunks, compute, save=lambda result, path: result.save(path),
                           load=UtilityResult.load, description=f"Utility ({cfg.estimator})", progress=self.progress)
        result = concat_utilities(parts)
        result.save(self.output / "utility.parquet")
        return result

    def load_features(self) -> FeatureTable:
        path = self.output / "features.parquet"
        if not path.is_file():
            raise StageInputMissing(f"{path} is missing; run `actsel extract` (or `actsel run`) with this config first.")
        return FeatureTable.load(path)

    def load_utility(self) -> UtilityResult:
        path = self.output / "utility.parquet"
        if not path.is_file():
            raise StageInputMissing(f"{path} is missing; run `actsel utility` (or `actsel run`) with this config first.")
        return UtilityResult.load(path)

    def correlate(self, features: FeatureTable | None = None, utility: UtilityResult | None = None) -> pd.DataFrame:
        """Spearman correlations, the max |rho| summary, reliability and the figures that show them."""
        from actsel.analysis import correlate, max_abs_rho_summary, split_half_reliability

        features = features if features is not None else self.load_features()
        utility = utility if utility is not None else self.load_utility()
        cfg = self.config.correlation
        correlations = correlate(features, utility, n_bootstrap=cfg.n_bootstrap, ci=cfg.ci, seed=self.config.seed,
                                 progress=self.progress)
        with atomic_path(self.output / "correlations.csv") as tmp:
            correlations.to_csv(tmp, index=False)
        summary = max_abs_rho_summary(correlations)
        summary.insert(0, "task", self.task.name)
        with atomic_path(self.output / "max_abs_rho.csv") as tmp:
            summary.to_csv(tmp, index=False)
        reliability = split_half_reliability(utility)
        write_json_atomic(self.output / "reliability.json", reliability)
        self._correlation_figures(features, utility, correlations)
        return correlations

    def _correlation_figures(self, features, utility, correlations) -> None:
        from actsel.analysis import correlation_heatmap, feature_scatter, moment_distributions, save_html

        figures = self.output / "figures"
        save_html(correlation_heatmap(correlations, facet="mask", title=f"Spearman rho per layer: {self.task.name}"),
                  figures / "heatmap_by_mask.html")
        save_html(correlation_heatmap(correlations, facet="hook", title=f"Spearman rho per layer: {self.task.name}"),
                  figures / "heatmap_by_hook.html")
        from actsel.analysis.plots_common import hook_without_layer

        for hook in sorted({hook_without_layer(name) for name in features.columns["hook"]}):
            for mask in sorted(set(features.columns["mask"])):
                figure = moment_distributions(features, statistic="kurtosis", hook=hook, mask=mask)
                save_html(figure, figures / f"kurtosis_{hook.replace('.', '_')}_{mask}.html")
        finite = correlations.dropna(subset=["rho"])
        if len(finite):
            best = finite.loc[finite["rho"].abs().idxmax()]
            key = {name: best[name] for name in ("mask", "hook", "layer", "span", "statistic")}
            key["layer"] = int(key["layer"])
            texts = {example.uid: self.task.render_input(example) for example in self.task.pool}
            save_html(feature_scatter(features, utility, texts=[texts.get(uid, uid) for uid in features.uids], **key),
                      figures / "top_feature_scatter.html")

    def massive(self, n_prompts: int = 8) -> pd.DataFrame:
        """Massive activations in the residual stream of the first pool examples, with their map."""
        from actsel.activations import find_massive_activations
        from actsel.analysis import massive_activation_map, save_html
        from actsel.prompts import PromptBuilder

        builder = PromptBuilder(self.task, self.model.tokenizer)
        prompts = [builder.build([example]) for example in self.task.pool[:n_prompts]]
        massive = find_massive_activations(self.model, prompts, hook="hook_resid_post")
        with atomic_path(self.output / "massive_activations.csv") as tmp:
            massive.to_csv(tmp, index=False)
        save_html(massive_activation_map(massive), self.output / "figures" / "massive_activations.html")
        return massive

    def select(self, features: FeatureTable | None = None, utility: UtilityResult | None = None) -> pd.DataFrame:
        """Selective annotation and k-shot evaluation for every strategy, budget and seed.

        Each strategy is one resumable chunk; the paired comparison against
        random is computed over all of them at the end.
        """
        from actsel.analysis import save_html
        from actsel.selection import SelectionResults, Strategy, learning_curves, run_selection

        cfg = self.config.selection
        needs_features = any(name.startswith("activation-") for name in cfg.strategies)
        if features is None and needs_features:
            features = self.load_features()
        if utility is None and "oracle" in cfg.strategies:
            utility = self.load_utility()
        folder = self._cache_dir("selection", "features", "utility", "selection")

        def strategy_for(name: str):
            if name == "activation-rank":
                return Strategy(name, params={**cfg.rank_feature, "order": cfg.rank_order})
            return name

        def compute(name: str) -> SelectionResults:
            return run_selection(
                self.model, self.task, [strategy_for(name)], cfg.budgets, cfg.seeds, k=cfg.k, features=features,
                utility=utility, progress=False, eval_seed=self.config.seed, n_prompts=cfg.n_prompts,
            )

        parts = run_chunks(
            folder, list(cfg.strategies), compute,
            save=lambda result, path: _save_raw(result.raw, path),
            load=lambda path: SelectionResults(pd.read_parquet(path), metric=""),
            description="Selection strategies", progress=self.progress,
        )
        raw = pd.concat([part.raw for part in parts], ignore_index=True)
        # Chunks loaded from the cache carry only their rows, so the metric comes from the rows themselves.
        metric = str(raw["metric"].iloc[0]) if len(raw) else ""
        results = SelectionResults(raw, metric, {"task": self.task.name})
        table = results.table()
        with atomic_path(self.output / "selection.csv") as tmp:
            table.to_csv(tmp, index=False)
        with atomic_path(self.output / "selection_raw.csv") as tmp:
            results.raw.to_csv(tmp, index=False)
        save_html(learning_curves(results), self.output / "figures" / "learning_curves.html")
        return table

    def report(self) -> Path:
        from actsel.pipeline.report import write_report

        return write_report(self)

    def run_all(self) -> Path:
        """Run every stage in order; a later call resumes from the caches."""
        self.write_manifest()
        features = self.extract()
        utility = self.utility()
        self.correlate(features, utility)
        self.massive()
        if self.config.selection.enabled and self.config.selection.strategies:
            self.select(features, utility)
        return self.report()


def concat_utilities(parts: list[UtilityResult]) -> UtilityResult:
    """Join utility results of disjoint candidate chunks."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    metadata = dict(first.metadata)
    metadata["chunks"] = len(parts)
    return UtilityResult(
        [uid for part in parts for uid in part.uids],
        np.concatenate([part.value for part in parts]),
        np.concatenate([part.stderr for part in parts]),
        np.concatenate([part.halves for part in parts], axis=1),
        first.estimator,
        first.metric,
        metadata,
    )


def _save_raw(raw: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        raw.to_parquet(tmp, index=False)


def with_output(config: RunConfig, output: str) -> RunConfig:
    return dataclasses.replace(config, output=output)
