"""Selective annotation: choose which pool examples to annotate as demonstrations, and compare strategies.

``select(name, context, budget, seed)`` runs one registered selector;
``run_selection`` runs the full experiment (selection, then k-shot evaluation
over seeds and budgets); ``learning_curves`` plots its results.
"""

from actsel.selection.base import (
    RETRIEVALS,
    SELECTORS,
    SelectionContext,
    SelectorInfo,
    Strategy,
    list_selectors,
    register_selector,
    select,
)
from actsel.selection.embeddings import EmbeddingCache, cosine_similarity_matrix, mean_pooled_embeddings
from actsel.selection import selectors as _selectors  # noqa: F401  (registers the built-in selectors)
from actsel.selection import votek as _votek  # noqa: F401  (registers vote-k and fast vote-k)
from actsel.selection.curves import learning_curves, save_figure_html
from actsel.selection.protocol import SelectionResults, evaluate_selection, retrieve_similar, run_selection

__all__ = [
    "RETRIEVALS", "SELECTORS", "EmbeddingCache", "SelectionContext", "SelectionResults", "SelectorInfo", "Strategy",
    "cosine_similarity_matrix", "evaluate_selection", "learning_curves", "list_selectors", "mean_pooled_embeddings",
    "register_selector", "retrieve_similar", "run_selection", "save_figure_html", "select",
]
