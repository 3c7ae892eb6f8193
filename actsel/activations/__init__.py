"""Activation statistics per layer, massive-activation detection, and the feature table they fill."""

from actsel.activations.extract import SPANS, extract_features
from actsel.activations.hooks import STATISTICS, collect_statistics, span_statistics
from actsel.activations.massive import find_massive_activations
from actsel.activations.moments import Moments
from actsel.activations.names import resolve_hooks
from actsel.activations.table import FEATURE_KEYS, FeatureTable

__all__ = [
    "FEATURE_KEYS", "FeatureTable", "Moments", "SPANS", "STATISTICS", "collect_statistics", "extract_features",
    "find_massive_activations", "resolve_hooks", "span_statistics",
]
