"""Plotly figures for actsel results; each returns a ``go.Figure`` and ``save_html`` writes it for offline viewing.

Text from datasets and tokenizers is HTML-escaped before it reaches a hover
label, title or legend, because plotly renders a subset of HTML there.
"""

from actsel.analysis.plots_activations import massive_activation_map, moment_distributions, token_dimension_map
from actsel.analysis.plots_common import escape_text, save_html
from actsel.analysis.plots_correlation import correlation_heatmap, feature_scatter

__all__ = [
    "correlation_heatmap",
    "escape_text",
    "feature_scatter",
    "massive_activation_map",
    "moment_distributions",
    "save_html",
    "token_dimension_map",
]
