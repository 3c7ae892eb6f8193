"""``report.html``: one offline page with the run's summary tables, main figures and links.

plotly.js is inlined once, in the first embedded figure, so the page opens
without network access. Every string from the data or config is escaped.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import pandas as pd

from actsel.io import write_text_atomic

logger = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; }
"""


def _table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    return frame.to_html(index=False, escape=True, float_format=float_format.format, na_rep="–", border=0)


def write_report(run) -> Path:
    """Write ``report.html`` into the run's output folder from the files the stages left there."""
    from actsel.analysis import correlation_heatmap

    output: Path = run.output
    config = run.config
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>actsel report: {html.escape(run.task.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>actsel report: {html.escape(run.task.name)}</h1>",
        "<p class='note'>Model <b>{}</b>; {} pool and {} evaluation examples; utility estimator <b>{}</b>; "
        "masks {}; hooks {}.</p>".format(
            html.escape(config.model.spec), len(run.task.pool), len(run.task.eval), html.escape(config.utility.estimator),
            html.escape(", ".join(config.features.masks)), html.escape(", ".join(config.features.hooks)),
        ),
    ]
    plotly_included = False

    def embed(figure) -> str:
        nonlocal plotly_included
        fragment = figure.to_html(full_html=False, include_plotlyjs=not plotly_included)
        plotly_included = True
        return fragment

    summary_path = output / "max_abs_rho.csv"
    if summary_path.is_file():
        parts.append("<h2>Largest |Spearman rho| per mask</h2>")
        parts.append(
            "<p class='note'>The published study (Osman, Merrett and Middleton 2026, Llama-3.2-3B and Qwen2.5-3B) "
            "found |rho| at most 0.33 for every task and mask. q is the Benjamini-Hochberg q-value over the whole "
            "grid.</p>"
        )
        parts.append(_table(pd.read_csv(summary_path)))
    reliability_path = output / "reliability.json"
    if reliability_path.is_file():
        reliability = json.loads(reliability_path.read_text())
        rows = pd.DataFrame([{"quantity": key, "value": value} for key, value in reliability.items()])
        parts.append("<h2>Split-half reliability of the utility</h2>")
        parts.append(
            "<p class='note'>A feature cannot correlate with the measured utility much more strongly than the "
            "utility correlates with itself; the ceiling is the square root of the Spearman-Brown reliability.</p>"
        )
        parts.append(_table(rows))
    correlations_path = output / "correlations.csv"
    if correlations_path.is_file():
        correlations = pd.read_csv(correlations_path)
        parts.append("<h2>Correlation per layer</h2>")
        parts.append(embed(correlation_heatmap(correlations, facet="mask", title="Spearman rho per layer, by mask")))
    selection_path = output / "selection.csv"
    if selection_path.is_file():
        parts.append("<h2>Selection of demonstrations</h2>")
        parts.append(_table(pd.read_csv(selection_path)))
    figures = sorted((output / "figures").glob("*.html")) if (output / "figures").is_dir() else []
    if figures:
        parts.append("<h2>Figures</h2><ul>")
        for figure in figures:
            relative = figure.relative_to(output).as_posix()
            parts.append(f"<li><a href='{html.escape(relative)}'>{html.escape(figure.stem.replace('_', ' '))}</a></li>")
        parts.append("</ul>")
    files = [name for name in ("correlations.csv", "max_abs_rho.csv", "features.parquet", "utility.parquet",
                               "selection.csv", "selection_raw.csv", "massive_activations.csv", "config.toml",
                               "versions.json") if (output / name).is_file()]
    parts.append("<h2>Files</h2><ul>")
    parts.extend(f"<li><a href='{html.escape(name)}'>{html.escape(name)}</a></li>" for name in files)
    parts.append("</ul></body></html>")
    path = output / "report.html"
    write_text_atomic(path, "\n".join(parts))
    logger.info("Wrote %s", path)
    return path
