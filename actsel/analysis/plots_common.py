"""Helpers shared by the plots: escaping dataset text for hover labels, and saving HTML that opens offline."""

from __future__ import annotations

import html
import re
from pathlib import Path

import plotly.graph_objects as go

from actsel.io import atomic_path

# Plotly renders a subset of HTML (<b>, <br>, <a href>, ...) in hover labels, titles,
# legends and axis labels, so any text taken from a dataset or tokenizer goes through
# ``escape_text`` before it reaches the figure.
DIVERGING_SCALE = "RdBu_r"

_LAYER_PREFIX = re.compile(r"^blocks\.\d+\.")


def escape_text(text: object, max_chars: int | None = None, wrap: int | None = None) -> str:
    """Escape ``text`` for a plotly label, after shortening it to ``max_chars`` and wrapping it every ``wrap`` characters.

    Newlines become ``\\n`` so that a label stays on the lines chosen here; the
    only markup in the result is the ``<br>`` inserted by ``wrap``.
    """
    text = str(text).replace("\r", "\\r").replace("\n", "\\n")
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1] + "\u2026"
    if not wrap:
        return html.escape(text)
    pieces = [html.escape(text[i : i + wrap]) for i in range(0, len(text), wrap)]
    return "<br>".join(pieces) if pieces else ""


def hook_without_layer(hook: str) -> str:
    """Drop a leading ``blocks.{L}.`` so hooks of different layers share one name (the layer is its own key)."""
    return _LAYER_PREFIX.sub("", hook)


def save_html(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a standalone HTML page with plotly.js inlined, atomically.

    The page opens without network access (about 4-5 MB, most of it plotly.js).

    Returns:
        The path written.
    """
    path = Path(path)
    if not isinstance(fig, go.Figure):
        raise TypeError(f"save_html needs a plotly.graph_objects.Figure, got {type(fig).__name__}.")
    with atomic_path(path) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True)
    return path
