"""Correlate activation features with example utility, and plot the results.

``correlate`` builds the per-feature Spearman grid, ``max_abs_rho_summary``
reduces it to the strongest feature per group, and ``split_half_reliability``
estimates how strong a correlation the utility's noise allows at all. The plots in
``actsel.analysis.plots`` draw these results and the activations behind them.
"""

from actsel.analysis.correlation import CORRELATION_COLUMNS, correlate, max_abs_rho_summary
from actsel.analysis.plots import (
    correlation_heatmap,
    feature_scatter,
    massive_activation_map,
    moment_distributions,
    save_html,
    token_dimension_map,
)
from actsel.analysis.reliability import split_half_reliability

__all__ = [
    "CORRELATION_COLUMNS",
    "correlate",
    "correlation_heatmap",
    "feature_scatter",
    "massive_activation_map",
    "max_abs_rho_summary",
    "moment_distributions",
    "save_html",
    "split_half_reliability",
    "token_dimension_map",
]
