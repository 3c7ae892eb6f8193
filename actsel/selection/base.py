"""Selector interface: a registry of named strategies and the context they read.

A selector picks ``budget`` examples of a task's candidate pool to annotate. It
is a function ``fn(context, budget, seed, **params) -> list[uid]`` registered
under a name with ``@register_selector(name)``. ``select`` is the one public
entry point: it validates the name, the budget and the result, so selectors
may assume their input is already checked.

``SelectionContext`` carries everything a selector may read: the model, the
task, optional activation features and measured utilities, an embedding cache
shared across calls, and the uids already annotated in earlier rounds (which a
selector never returns again).

Each selector also names the test-time retrieval it is meant to be evaluated
with: ``"fixed"`` (one prompt of k demonstrations drawn from the selected set)
or ``"similar"`` (per query, the k selected examples most similar to it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

from transformer_lens import HookedTransformer

from actsel.activations.table import FeatureTable
from actsel.selection.embeddings import EmbeddingCache, EmbeddingFn, default_embedding_fn
from actsel.tasks.base import Example, Task
from actsel.utility.result import UtilityResult

logger = logging.getLogger(__name__)

RETRIEVALS = ("fixed", "similar")

SelectorFn = Callable[..., list[str]]


@dataclass(frozen=True)
class SelectorInfo:
    """A registered selector and the retrieval it is evaluated with by default."""

    name: str
    fn: SelectorFn
    retrieval: str
    description: str


SELECTORS: dict[str, SelectorInfo] = {}


def register_selector(name: str, *, retrieval: str = "fixed") -> Callable[[SelectorFn], SelectorFn]:
    """Register ``fn(context, budget, seed, **params) -> list[uid]`` under ``name``; duplicates raise."""
    if retrieval not in RETRIEVALS:
        raise ValueError(f"Unknown retrieval {retrieval!r}; valid: {RETRIEVALS}.")

    def decorator(fn: SelectorFn) -> SelectorFn:
        if name in SELECTORS:
            raise ValueError(f"A selector named {name!r} is already registered; choose another name.")
        doc_lines = (fn.__doc__ or "").strip().splitlines()
        SELECTORS[name] = SelectorInfo(name, fn, retrieval, doc_lines[0] if doc_lines else "")
        return fn

    return decorator


def list_selectors() -> list[str]:
    return sorted(SELECTORS)


@dataclass
class SelectionContext:
    """Inputs a selector may read.

    Attributes:
        model: the model for model-based strategies (embeddings, uncertainty,
            vote-k confidence). ``None`` works for strategies that need none
            when ``embed_fn`` is given or no embedding is needed.
        task: its ``pool`` is the candidate set.
        features: activation statistics per candidate (activation-rank, -diversity).
        utility: measured utility per candidate (oracle).
        embed_fn: maps examples to vectors of shape (n, d); ``None`` uses the
            model's mean-pooled last-layer residual stream.
        selected: uids annotated in earlier rounds. Selectors treat them as
            already chosen and never return them.
        k: demonstrations per prompt whenever a selector runs the model with
            demonstrations (uncertainty after the first round, vote-k confidence).
        batch_size: prompts per forward pass.
        progress: show progress bars.
        embedding_cache: embeddings by uid, shared by contexts of one run.
        memo: model outputs that selectors reuse across calls, keyed by the
            selector (for example zero-shot entropies), shared like the cache.
    """

    model: HookedTransformer | None
    task: Task
    features: FeatureTable | None = None
    utility: UtilityResult | None = None
    embed_fn: EmbeddingFn | None = None
    selected: list[str] = field(default_factory=list)
    k: int = 4
    batch_size: int = 16
    progress: bool = False
    embedding_cache: EmbeddingCache | None = None
    memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}.")
        pool_uids = {example.uid for example in self.task.pool}
        unknown = [uid for uid in self.selected if uid not in pool_uids]
        if unknown:
            raise ValueError(f"{len(unknown)} selected uids are not in the pool of task {self.task.name!r}, "
                             f"for example {unknown[0]!r}.")
        if len(set(self.selected)) != len(self.selected):
            raise ValueError("selected contains duplicate uids.")
        if self.embedding_cache is None and (self.embed_fn is not None or self.model is not None):
            embed_fn = self.embed_fn or default_embedding_fn(self.model, self.task, batch_size=self.batch_size,
                                                             progress=self.progress)
            self.embedding_cache = EmbeddingCache(embed_fn)

    @property
    def examples_by_uid(self) -> dict[str, Example]:
        return {example.uid: example for example in self.task.pool}

    @property
    def available(self) -> list[Example]:
        """Pool examples not yet selected, in pool order."""
        chosen = set(self.selected)
        return [example for example in self.task.pool if example.uid not in chosen]

    def embeddings(self, examples: Sequence[Example]):
        """Return the embeddings of ``examples``, shape (n, d), through the shared cache."""
        if self.embedding_cache is None:
            raise ValueError("This strategy needs embeddings: pass a model or an embed_fn to the SelectionContext.")
        return self.embedding_cache.get(examples)

    def require_model(self, strategy: str) -> HookedTransformer:
        if self.model is None:
            raise ValueError(f"Strategy {strategy!r} runs the model; pass model=... in the SelectionContext.")
        return self.model

    def with_selected(self, selected: Sequence[str]) -> "SelectionContext":
        """Return a copy with another already-annotated set, sharing the embedding cache."""
        return SelectionContext(self.model, self.task, self.features, self.utility, self.embed_fn, list(selected),
                                self.k, self.batch_size, self.progress, self.embedding_cache, self.memo)


def select(name: str, context: SelectionContext, budget: int, seed: int = 0, **params) -> list[str]:
    """Pick ``budget`` new uids from ``context.task.pool`` with the selector ``name``.

    Args:
        name: a key of ``SELECTORS``.
        context: what the selector may read; uids in ``context.selected`` are
            never returned.
        budget: number of uids to return, 1 to the number of unselected pool examples.
        seed: random seed for selectors with random steps or tie-breaking.
        **params: selector options (see each selector's docstring).

    Returns:
        ``budget`` distinct uids, in the order the selector picked them.
    """
    if name not in SELECTORS:
        raise ValueError(f"Unknown selector {name!r}; valid: {list_selectors()}.")
    n_available = len(context.available)
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= n_available:
        raise ValueError(
            f"budget {budget!r} is invalid; it must be an integer from 1 to {n_available} (the unselected "
            f"examples in the pool of {len(context.task.pool)})."
        )
    picked = list(SELECTORS[name].fn(context, budget, seed, **params))
    available = {example.uid for example in context.available}
    if len(picked) != budget or len(set(picked)) != budget or not set(picked) <= available:
        raise RuntimeError(
            f"Selector {name!r} returned {len(picked)} uids ({len(set(picked))} distinct, "
            f"{len(set(picked) - available)} not available) for a budget of {budget}; this is a bug in the selector."
        )
    logger.debug("Selector %s picked %d uids (seed %d)", name, budget, seed)
    return picked


@dataclass(frozen=True)
class Strategy:
    """One strategy of an experiment: a selector, its options and the test-time retrieval.

    Attributes:
        selector: a key of ``SELECTORS``.
        params: keyword options passed to the selector.
        retrieval: ``"fixed"`` or ``"similar"``; ``None`` uses the selector's default.
        label: name in results tables; defaults to the selector name.
    """

    selector: str
    params: dict = field(default_factory=dict)
    retrieval: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.selector not in SELECTORS:
            raise ValueError(f"Unknown selector {self.selector!r}; valid: {list_selectors()}.")
        if self.retrieval is not None and self.retrieval not in RETRIEVALS:
            raise ValueError(f"Unknown retrieval {self.retrieval!r}; valid: {RETRIEVALS}.")

    @property
    def name(self) -> str:
        return self.label or self.selector

    @property
    def resolved_retrieval(self) -> str:
        return self.retrieval or SELECTORS[self.selector].retrieval


def as_strategy(spec: str | Strategy) -> Strategy:
    """Turn a selector name into a ``Strategy`` with default options."""
    return spec if isinstance(spec, Strategy) else Strategy(spec)
