"""Learning curves of selection results: metric against budget, one line and band per strategy."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from actsel.io import atomic_path

if TYPE_CHECKING:
    from actsel.selection.protocol import SelectionResults


def _rgba(color: str, alpha: float) -> str:
    """Turn a ``#rrggbb`` or ``rgb(r, g, b)`` colour into ``rgba(r, g, b, alpha)``."""
    if color.startswith("#"):
        red, green, blue = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    else:
        red, green, blue = (int(part) for part in color[color.index("(") + 1:color.index(")")].split(","))
    return f"rgba({red}, {green}, {blue}, {alpha})"


def learning_curves(results: "SelectionResults", title: str | None = None) -> go.Figure:
    """Plot the mean metric over seeds against the budget, with a band of mean ± one standard deviation.

    With a single seed the standard deviation is undefined and no band is drawn.
    """
    table = results.table()
    figure = go.Figure()
    palette = qualitative.Plotly
    for index, (strategy, group) in enumerate(table.groupby("strategy", sort=False)):
        group = group.sort_values("budget")
        color = palette[index % len(palette)]
        budgets = group["budget"].to_numpy()
        mean = group["mean"].to_numpy()
        std = np.nan_to_num(group["std"].to_numpy(), nan=0.0)
        if group["n_seeds"].max() > 1:
            figure.add_trace(go.Scatter(
                x=np.concatenate([budgets, budgets[::-1]]), y=np.concatenate([mean + std, (mean - std)[::-1]]),
                mode="lines", fill="toself", fillcolor=_rgba(color, 0.15), line={"width": 0}, hoverinfo="skip",
                showlegend=False, legendgroup=strategy, name=f"{strategy} ± sd",
            ))
        figure.add_trace(go.Scatter(
            x=budgets, y=mean, mode="lines+markers", name=strategy, legendgroup=strategy,
            line={"color": color}, customdata=np.stack([std, group["n_seeds"].to_numpy()], axis=1),
            hovertemplate="budget %{x}<br>mean %{y:.3f}<br>sd %{customdata[0]:.3f}<br>seeds %{customdata[1]}",
        ))
    task = results.metadata.get("task")
    on_task = f" on {task}" if task else ""
    figure.update_layout(
        title=title or f"Selective annotation{on_task}: {results.metric} against budget",
        xaxis_title="annotation budget", yaxis_title=f"{results.metric} (mean over seeds)",
        template="plotly_white",
    )
    return figure


def save_figure_html(figure: go.Figure, path: str | Path) -> None:
    """Write ``figure`` as a self-contained HTML file (plotly.js embedded, no network needed), atomically."""
    with atomic_path(path) as tmp:
        figure.write_html(tmp, include_plotlyjs=True, full_html=True)
