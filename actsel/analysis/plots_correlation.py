"""Plots of the feature-utility correlation: a per-layer heatmap and a scatter of one feature against utility."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats

from actsel.activations.table import FeatureTable
from actsel.analysis.plots_common import DIVERGING_SCALE, escape_text, hook_without_layer
from actsel.utility.result import UtilityResult

HEATMAP_FACETS = ("mask", "hook", "span", None)
_HEATMAP_COLUMNS = ("layer", "statistic", "rho", "ci_low", "ci_high", "q_value", "n")


def correlation_heatmap(
    correlations: pd.DataFrame,
    *,
    facet: str | None = "mask",
    title: str | None = None,
    significance: float | None = 0.05,
) -> go.Figure:
    """Draw rho per layer (x) and statistic (y), one panel per value of ``facet``.

    Rows are statistics. When another key among mask, hook and span takes more
    than one value inside a panel, its value is prefixed to the row name
    (``hook_mlp_out / example / kurtosis``). A leading ``blocks.{L}.`` is dropped
    from hook names, because the layer is on the x axis. The colour scale is
    diverging and fixed to [-1, 1], centred on 0. Hover shows rho, its
    bootstrap interval, q and n; cells with q < ``significance`` are marked
    with ``*``.

    Args:
        correlations: output of ``correlate``.
        facet: ``"mask"``, ``"hook"``, ``"span"`` or None for one panel.
        title: figure title; by default it names the task and utility from
            ``correlations.attrs``.
        significance: q-value threshold for the ``*`` marks, or None for none.

    Returns:
        The figure (displays in Jupyter; save with ``save_html``).
    """
    if facet not in HEATMAP_FACETS:
        raise ValueError(f"Unknown facet {facet!r}; valid: {list(HEATMAP_FACETS)}.")
    needed = list(_HEATMAP_COLUMNS) + ([facet] if facet else [])
    missing = [name for name in needed if name not in correlations.columns]
    if missing:
        raise ValueError(f"correlations has no column {missing}; pass the output of correlate.")
    if correlations.empty:
        raise ValueError("correlations is empty; there is nothing to plot.")

    frame = correlations.copy()
    if "hook" in frame.columns:
        frame["hook"] = frame["hook"].astype(str).map(hook_without_layer)
    row_keys = [
        key for key in ("mask", "hook", "span") if key != facet and key in frame.columns and frame[key].nunique() > 1
    ]
    frame["row"] = frame[row_keys + ["statistic"]].astype(str).agg(" / ".join, axis=1)
    panels = list(pd.unique(frame[facet])) if facet else [None]
    rows_in_order = list(pd.unique(frame["row"]))
    layers = sorted(frame["layer"].unique())
    level = correlations.attrs.get("ci")
    interval_name = f"{100 * level:g}% CI" if level else "CI"

    fig = make_subplots(
        rows=len(panels),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=min(0.08, 0.3 / max(1, len(panels))),
        subplot_titles=[f"{facet} = {escape_text(panel)}" for panel in panels] if facet else None,
    )
    for index, panel in enumerate(panels, start=1):
        part = frame if panel is None else frame[frame[facet] == panel]
        duplicated = part.duplicated(["row", "layer"])
        if duplicated.any():
            example = part.loc[duplicated, ["row", "layer"]].iloc[0].to_dict()
            raise ValueError(
                f"Two features share the cell {example} in panel {panel!r}; filter the correlations "
                "(for example to one hook) or choose another facet."
            )
        present = [row for row in rows_in_order if row in set(part["row"])]
        grid = part.pivot(index="row", columns="layer", values=["rho", "ci_low", "ci_high", "q_value", "n"])
        rho = grid["rho"].reindex(index=present, columns=layers)
        extra_columns = ("ci_low", "ci_high", "q_value", "n")
        extra = np.stack(
            [grid[name].reindex(index=present, columns=layers).to_numpy(dtype=float) for name in extra_columns], axis=-1
        )  # (rows, layers, 4)
        marks = None
        if significance is not None:
            marks = np.where(extra[..., 2] < significance, "*", "")
        fig.add_trace(
            go.Heatmap(
                z=rho.to_numpy(dtype=float),
                x=layers,
                y=[escape_text(row) for row in present],
                customdata=extra,
                coloraxis="coloraxis",
                text=marks,
                texttemplate="%{text}" if marks is not None else None,
                hovertemplate=(
                    "layer %{x}<br>%{y}<br>rho = %{z:.3f}<br>"
                    + interval_name
                    + " [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>q = %{customdata[2]:.3g}<br>"
                    "n = %{customdata[3]:.0f}<extra></extra>"
                ),
                xgap=1,
                ygap=1,
            ),
            row=index,
            col=1,
        )
        fig.update_yaxes(title_text=" / ".join(row_keys + ["statistic"]), autorange="reversed", row=index, col=1)
    fig.update_xaxes(title_text="layer", dtick=1 if len(layers) <= 32 else None, row=len(panels), col=1)

    if title is None:
        title = _default_title(correlations.attrs)
    fig.update_layout(
        title=escape_text(title),
        coloraxis=dict(colorscale=DIVERGING_SCALE, cmin=-1.0, cmax=1.0, colorbar=dict(title="Spearman rho")),
        height=120 + len(panels) * (60 + 22 * len(rows_in_order)),
        template="plotly_white",
    )
    return fig


def _default_title(attrs: dict) -> str:
    parts = ["Spearman rho of features with utility"]
    details = [str(attrs[key]) for key in ("task", "model", "utility_estimator", "utility_metric") if attrs.get(key)]
    if details:
        parts.append(f"({', '.join(details)})")
    return " ".join(parts)


def feature_scatter(
    features: FeatureTable,
    utility: UtilityResult | np.ndarray | Sequence[float],
    *,
    texts: Mapping[str, str] | Sequence[str] | None = None,
    title: str | None = None,
    **key,
) -> go.Figure:
    """Scatter one feature (x) against utility (y), one colour per label, with stderr error bars.

    Args:
        features: the feature table; ``key`` (for example ``mask="causal",
            hook="hook_resid_post", layer=12, span="example",
            statistic="kurtosis"``) must select exactly one feature.
        utility: a ``UtilityResult``, matched by uid, whose ``stderr`` gives
            the error bars. An array of shape (n_examples,) in the row order
            of ``features`` is also accepted, and then no error bars are drawn.
        texts: example text for the hover label, as a mapping uid -> text or a
            sequence in the row order of ``features``. It is escaped, so markup
            in the data shows as text.
        title: figure title; by default the feature name and its Spearman rho.

    Returns:
        The figure.
    """
    column = features.feature_index(**key)
    x = features.values[:, column]
    uids, labels = list(features.uids), list(features.labels)
    if isinstance(utility, UtilityResult):
        have = set(utility.uids)
        rows = [row for row, uid in enumerate(uids) if uid in have]
        if not rows:
            raise ValueError("No uid is shared by the features and the utility.")
        aligned = utility.take([uids[row] for row in rows])
        y, stderr = aligned.value, aligned.stderr
    else:
        y = np.asarray(utility, dtype=float)
        if y.shape != (len(uids),):
            raise ValueError(f"utility array has shape {y.shape}; expected ({len(uids)},) in the order of features.uids.")
        rows, stderr = list(range(len(uids))), None
    hover_texts = _texts_for(texts, uids, rows)

    x, uids, labels = x[rows], [uids[row] for row in rows], [labels[row] for row in rows]
    fig = go.Figure()
    for label in pd.unique(pd.Series(labels)):
        members = np.flatnonzero(np.asarray(labels) == label)
        custom = [[escape_text(uids[i]), escape_text(label), hover_texts[i]] for i in members]
        fig.add_trace(
            go.Scatter(
                x=x[members],
                y=y[members],
                mode="markers",
                name=escape_text(label, max_chars=40),
                error_y=dict(type="data", array=stderr[members], visible=True, thickness=1) if stderr is not None else None,
                customdata=custom,
                hovertemplate=(
                    "%{customdata[0]} (%{customdata[1]})<br>feature = %{x:.4g}<br>utility = %{y:.4g}"
                    "<br>%{customdata[2]}<extra></extra>"
                ),
            )
        )

    name = features.feature_name(column)
    if title is None:
        title = f"{name}: {_spearman_text(x, y)}"
    fig.update_layout(
        title=escape_text(title),
        xaxis_title=escape_text(name),
        yaxis_title="utility" + (f" ({escape_text(utility.estimator)}, {escape_text(utility.metric)})" if isinstance(utility, UtilityResult) else ""),
        legend_title="label",
        template="plotly_white",
    )
    return fig


def _texts_for(texts, uids: list[str], rows: list[int]) -> list[str]:
    """Escaped, wrapped hover text per kept row; empty where no text is given."""
    if texts is None:
        return [""] * len(rows)
    if isinstance(texts, Mapping):
        chosen = [texts.get(uids[row], "") for row in rows]
    else:
        texts = list(texts)
        if len(texts) != len(uids):
            raise ValueError(f"texts has {len(texts)} entries for {len(uids)} examples; pass one per row or a uid mapping.")
        chosen = [texts[row] for row in rows]
    return [escape_text(text, max_chars=600, wrap=80) for text in chosen]


def _spearman_text(x: np.ndarray, y: np.ndarray) -> str:
    finite = np.isfinite(x) & np.isfinite(y)
    if finite.sum() < 3 or np.ptp(x[finite]) == 0 or np.ptp(y[finite]) == 0:
        return f"Spearman rho undefined (n = {int(finite.sum())})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.spearmanr(x[finite], y[finite])
    return f"Spearman rho = {result.statistic:.3f}, p = {result.pvalue:.2g}, n = {int(finite.sum())}"
