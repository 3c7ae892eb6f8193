"""Plots of the activations themselves: moment distributions per layer and massive-activation maps."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float

from actsel.activations.table import FeatureTable
from actsel.analysis.plots_common import escape_text, hook_without_layer

DISTRIBUTION_KINDS = ("box", "violin")
# More traces than this make one layer's boxes too thin to read.
_MAX_TRACES = 12
# |a| below this is drawn at this level on log colour scales (log10 of 0 is undefined).
_LOG_FLOOR = 1e-3


def moment_distributions(
    features: FeatureTable,
    *,
    statistic: str = "kurtosis",
    hook: str | None = None,
    mask: str | None = None,
    span: str | None = None,
    kind: str = "box",
    log_y: bool = False,
    title: str | None = None,
) -> go.Figure:
    """Draw the distribution over examples of one statistic at every layer (box or violin per layer).

    ``hook``, ``mask`` and ``span`` filter the features; each remaining
    (mask, hook, span) combination becomes one trace, grouped side by side per
    layer. Hover on a point shows its example uid.

    Args:
        features: the feature table.
        statistic: statistic name, for example ``"kurtosis"`` or ``"max_abs"``.
        hook: keep this hook (None keeps all); ``"hook_resid_post"`` also
            matches ``"blocks.{L}.hook_resid_post"`` at every layer.
        mask, span: optional filters (None keeps every value).
        kind: ``"box"`` or ``"violin"``.
        log_y: log-scaled y axis (only for positive statistics).
        title: figure title; by default the statistic name.

    Returns:
        The figure.

    Raises:
        ValueError: for an unknown statistic, filter value or kind, or more than
            12 combinations left to draw.
    """
    if kind not in DISTRIBUTION_KINDS:
        raise ValueError(f"Unknown kind {kind!r}; valid: {list(DISTRIBUTION_KINDS)}.")
    filters = {"statistic": statistic, "mask": mask, "span": span}
    selected = features.select(**{name: value for name, value in filters.items() if value is not None})
    if hook is not None:
        selected = _select_hook(selected, hook)
    columns = selected.columns.copy()
    columns["hook"] = columns["hook"].astype(str).map(hook_without_layer)
    combos = columns[["mask", "hook", "span"]].drop_duplicates()
    if len(combos) > _MAX_TRACES:
        raise ValueError(
            f"{len(combos)} (mask, hook, span) combinations match statistic={statistic!r}; pass hook=, mask= or "
            f"span= to draw at most {_MAX_TRACES}. Masks: {sorted(columns['mask'].unique())}, hooks: "
            f"{sorted(columns['hook'].unique())}, spans: {sorted(columns['span'].unique())}."
        )

    trace_type = go.Box if kind == "box" else go.Violin
    uid_text = [escape_text(uid, max_chars=60) for uid in selected.uids]
    fig = go.Figure()
    for combo in combos.itertuples(index=False):
        chosen = np.flatnonzero(
            (columns["mask"] == combo.mask).to_numpy()
            & (columns["hook"] == combo.hook).to_numpy()
            & (columns["span"] == combo.span).to_numpy()
        )
        chosen = chosen[np.argsort(columns["layer"].to_numpy()[chosen], kind="stable")]
        layers = columns["layer"].to_numpy()[chosen]
        values = selected.values[:, chosen]  # (n_examples, n_layers)
        x = np.repeat(layers[None, :], values.shape[0], axis=0).ravel()
        text = np.repeat(np.asarray(uid_text)[:, None], len(chosen), axis=1).ravel()
        keep = np.isfinite(values.ravel())
        name = " / ".join(escape_text(part) for part in (combo.mask, combo.hook, combo.span))
        fig.add_trace(trace_type(x=x[keep], y=values.ravel()[keep], text=text[keep], name=name))

    if title is None:
        title = f"{statistic} per layer over {selected.n_examples} examples"
        if len(combos) == 1:  # plotly shows no legend for one trace, so the title names it
            title += ": " + " / ".join(str(part) for part in combos.iloc[0])
    fig.update_layout(
        title=escape_text(title),
        xaxis_title="layer",
        yaxis_title=escape_text(statistic),
        template="plotly_white",
    )
    if kind == "box":
        fig.update_layout(boxmode="group")
    else:
        fig.update_layout(violinmode="group")
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def _select_hook(features: FeatureTable, hook: str) -> FeatureTable:
    """Keep features whose hook is ``hook``, with or without its ``blocks.{L}.`` prefix."""
    names = features.columns["hook"].astype(str)
    keep = (names == hook) | (names.map(hook_without_layer) == hook)
    if not keep.any():
        valid = sorted(set(names.map(hook_without_layer)))
        raise ValueError(f"No feature has hook={hook!r}; valid hooks: {valid} (with or without 'blocks.{{L}}.').")
    return features.select(hook=sorted(set(names[keep])))


def massive_activation_map(
    massive: pd.DataFrame,
    *,
    hook: str | None = None,
    n_layers: int | None = None,
    log_color: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Draw the maximum ``|value|`` per layer (y) and dimension (x) over the rows of ``massive``.

    Only dimensions that occur in ``massive`` get a column. Hover shows the
    count of rows in the cell and the prompt, position and token of the
    largest one.

    Args:
        massive: one row per massive activation with the columns ``layer``,
            ``dimension`` and ``value``, and optionally ``prompt``,
            ``position``, ``token`` and ``hook`` (as ``find_massive_activations`` returns).
        hook: keep the rows of this hook (with or without ``blocks.{L}.``);
            required when the ``hook`` column contains more than one hook.
        n_layers: draw layers 0 .. n_layers - 1 even where nothing is massive;
            by default the layers from 0 to the largest one present.
        log_color: colour by log10 ``|value|``.
        title: figure title.

    Returns:
        The figure; with no rows it carries a note saying so.
    """
    missing = [name for name in ("layer", "dimension", "value") if name not in massive.columns]
    if missing:
        raise ValueError(f"massive has no column {missing}; expected layer, dimension, value (and prompt, position, token).")
    title = escape_text(title if title is not None else "Massive activations: max |a| per layer and dimension")
    fig = go.Figure()
    if massive.empty:
        fig.add_annotation(text="No massive activations found.", showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
        fig.update_layout(title=title, template="plotly_white")
        return fig

    frame = massive.copy()
    if "hook" in frame.columns:
        names = frame["hook"].astype(str).map(hook_without_layer)
        if hook is not None:
            keep = (frame["hook"].astype(str) == hook) | (names == hook)
            if not keep.any():
                raise ValueError(f"No row has hook={hook!r}; hooks present: {sorted(set(names))}.")
            frame = frame[keep]
        elif names.nunique() > 1:
            raise ValueError(f"massive contains rows of several hooks {sorted(set(names))}; pass hook= to draw one of them.")
    frame["magnitude"] = frame["value"].abs()
    for optional in ("prompt", "position", "token"):
        if optional not in frame.columns:
            frame[optional] = ""
    top = frame.loc[frame.groupby(["layer", "dimension"])["magnitude"].idxmax()].set_index(["layer", "dimension"])
    top["count"] = frame.groupby(["layer", "dimension"]).size()

    last_layer = int(frame["layer"].max()) + 1 if n_layers is None else n_layers
    layers = list(range(last_layer))
    dimensions = sorted(int(d) for d in frame["dimension"].unique())
    shape = (len(layers), len(dimensions))
    magnitude = np.full(shape, np.nan)
    custom = np.full(shape + (5,), "", dtype=object)
    column_of = {d: j for j, d in enumerate(dimensions)}
    for (layer, dimension), row in top.iterrows():
        if not 0 <= layer < last_layer:
            continue
        i, j = int(layer), column_of[int(dimension)]
        magnitude[i, j] = row["magnitude"]
        custom[i, j] = [
            f"{row['value']:.4g}",
            str(int(row["count"])),
            escape_text(row["prompt"], max_chars=40),
            escape_text(row["position"]),
            escape_text(row["token"], max_chars=30),
        ]

    z = np.log10(np.maximum(magnitude, _LOG_FLOOR)) if log_color else magnitude
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=[f"d{d}" for d in dimensions],
            y=layers,
            customdata=custom,
            colorscale="Inferno",
            colorbar=dict(title="log10 max |a|" if log_color else "max |a|"),
            hovertemplate=(
                "layer %{y}, dimension %{x}<br>value %{customdata[0]} (%{customdata[1]} rows)"
                "<br>prompt %{customdata[2]}, position %{customdata[3]}, token %{customdata[4]}<extra></extra>"
            ),
            xgap=1,
            ygap=1,
        )
    )
    fig.update_layout(title=title, xaxis_title="dimension", yaxis_title="layer", template="plotly_white")
    fig.update_xaxes(type="category")
    return fig


def token_dimension_map(
    values: Float[np.ndarray, "pos d_model"],
    tokens: Sequence[str],
    *,
    dims: Sequence[int] | None = None,
    top_dims: int | None = None,
    log_color: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Draw ``|values|`` of one prompt per token (y) and dimension (x).

    Args:
        values: activations of one prompt at one hook, shape (pos, d_model) (a
            numpy array or a CPU/GPU tensor).
        tokens: token strings, one per position; they are escaped, and each row
            label starts with its position so repeated tokens stay apart.
        dims: dimensions to draw (by default all).
        top_dims: keep only the ``top_dims`` dimensions with the largest
            ``|value|`` at any position (after ``dims``).
        log_color: colour by log10 ``|value|``; hover shows the signed value.
        title: figure title.

    Returns:
        The figure.
    """
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"values must have shape (pos, d_model), got {values.shape}; pass one prompt at one hook.")
    if len(tokens) != values.shape[0]:
        raise ValueError(f"{len(tokens)} tokens for {values.shape[0]} positions; pass one token string per position.")
    columns = np.arange(values.shape[1]) if dims is None else np.asarray(list(dims), dtype=int)
    invalid = sorted(set(columns[(columns < 0) | (columns >= values.shape[1])].tolist()))
    if invalid:
        raise ValueError(f"Invalid dims {invalid[:5]}; each must lie in [0, {values.shape[1]}).")
    if top_dims is not None:
        if top_dims < 1:
            raise ValueError(f"top_dims must be at least 1, got {top_dims}.")
        peak = np.abs(values[:, columns]).max(axis=0)
        columns = np.sort(columns[np.argsort(-peak, kind="stable")[:top_dims]])

    shown = values[:, columns]  # (pos, n_dims)
    magnitude = np.abs(shown)
    z = np.log10(np.maximum(magnitude, _LOG_FLOOR)) if log_color else magnitude
    rows = [f"{position}: {escape_text(token, max_chars=20)}" for position, token in enumerate(tokens)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"d{d}" for d in columns],
            y=rows,
            customdata=shown,
            colorscale="Inferno",
            colorbar=dict(title="log10 |a|" if log_color else "|a|"),
            hovertemplate="%{y}<br>dimension %{x}<br>value %{customdata:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        title=escape_text(title if title is not None else "Activation magnitude per token and dimension"),
        xaxis_title="dimension",
        yaxis_title="token",
        template="plotly_white",
        height=max(400, 18 * len(rows) + 150),
    )
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return fig
