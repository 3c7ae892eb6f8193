"""Score k-shot prompts on evaluation queries with one metric per query.

``score_prompts`` runs every prompt in full (each query may have its own
demonstrations). ``score_with_prefix`` is for one demonstration set and many
queries: it runs the shared prefix (BOS, demonstrations and the separator before
the query) once and every query's continuation through the prefix's key-value
cache (see ``actsel.utility.kv_cache``). Both return the same numbers up to
floating-point error; ``tests/test_scoring.py`` checks this on SmolLM2.

An attention-mask strategy (``actsel.masks``) applies while scoring: each
prompt's full allowed matrix is built from its segment map, the prefix is run
with the prefix block of it and each continuation with its own rows. Tokens
generated for ``exact_match`` attend like the last query-input token, plus the
tokens generated before them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.prompts import Prompt, PromptBuilder, batches_by_length
from actsel.tasks.base import Example, Task
from actsel.utility.kv_cache import PrefixCache, build_prefix_cache, logits_at, run_continuations
from actsel.utility.metrics import check_metric, exact_match, label_metrics, mean_token_logprob

logger = logging.getLogger(__name__)

# Greedy decoding for exact_match generates at most
# max(EXACT_MATCH_MIN_NEW_TOKENS, longest gold answer in characters + EXACT_MATCH_EXTRA_TOKENS)
# tokens. A row usually stops long before (see _greedy_exact_match); the cap
# only ends rows that keep producing leading whitespace or empty-text tokens.
EXACT_MATCH_MIN_NEW_TOKENS = 10
EXACT_MATCH_EXTRA_TOKENS = 4

# Scoring batches hold prompts (or continuations) of similar length: at most this
# fraction of a batch's positions is padding (see batches_by_length).
# NOTE: 0.15 was measured on two CPU cores only; a GPU may favour fuller batches.
MAX_PADDING = 0.15

MaskSpec = str | Callable[[Prompt], np.ndarray] | None


@dataclass
class _Scorer:
    """Scoring state shared by all batches of one call: prompt builder, label tokens, pad id and metric."""

    model: HookedTransformer
    task: Task
    metric: str
    mask: MaskSpec
    builder: PromptBuilder
    label_ids: list[int] | None
    pad_id: int

    def build(self, demos: Sequence[Example], query: Example) -> Prompt:
        return self.builder.build(demos, query, include_answer=self.metric == "answer_logprob")

    def allowed(self, prompts: Sequence[Prompt]) -> list[np.ndarray] | None:
        if self.mask is None:
            return None
        from actsel.masks import allowed_matrix

        return [allowed_matrix(prompt, self.mask) for prompt in prompts]


def _make_scorer(model: HookedTransformer, task: Task, metric: str, mask: MaskSpec) -> _Scorer:
    check_metric(task, metric)
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("The model has no tokenizer; load it with actsel.load_model or attach one.")
    if isinstance(mask, str) and mask == "causal":
        mask = None  # causal attention is what the model does without hooks
    builder = PromptBuilder(task, tokenizer, max_tokens=model.cfg.n_ctx)
    label_ids = task.label_token_ids(tokenizer) if task.kind == "classification" else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _Scorer(model, task, metric, mask, builder, label_ids, int(pad_id if pad_id is not None else 0))


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")


def score_prompts(
    model: HookedTransformer,
    task: Task,
    demos_per_query: Sequence[Sequence[Example]],
    queries: Sequence[Example],
    metric: str,
    *,
    mask: MaskSpec = None,
    batch_size: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Score each query with its own demonstrations, running every prompt in full.

    Args:
        model: the model.
        task: the task that renders the prompts.
        demos_per_query: the demonstrations of each query's prompt, in order.
        queries: evaluation queries.
        metric: one of ``METRICS`` that is defined for the task kind.
        mask: attention-mask strategy name or callable (``actsel.masks``);
            None or ``"causal"`` for plain causal attention.
        batch_size: maximum number of prompts per forward pass. Prompts are
            grouped by length, and a batch ends early before more than
            ``MAX_PADDING`` of its positions would be padding.
        progress: show a progress bar over batches.

    Returns:
        float64 scores, shape (n_queries,), in query order.
    """
    if len(demos_per_query) != len(queries):
        raise ValueError(
            f"demos_per_query has {len(demos_per_query)} entries but there are {len(queries)} queries; "
            f"pass one demonstration list per query."
        )
    if not queries:
        raise ValueError("No queries to score.")
    _check_batch_size(batch_size)
    scorer = _make_scorer(model, task, metric, mask)
    prompts = [scorer.build(demos, query) for demos, query in zip(demos_per_query, queries)]
    allowed = scorer.allowed(prompts)
    scores = np.empty(len(prompts), dtype=np.float64)
    batches = batches_by_length(prompts, batch_size, max_padding=MAX_PADDING)
    for batch in tqdm(batches, desc="scoring prompts", disable=not progress, leave=False):
        scores[batch] = _score_batch(
            scorer, [prompts[i] for i in batch], [queries[i] for i in batch], None,
            None if allowed is None else [allowed[i] for i in batch],
        )
    return scores


def score_with_prefix(
    model: HookedTransformer,
    task: Task,
    demos: Sequence[Example],
    queries: Sequence[Example],
    metric: str,
    *,
    mask: MaskSpec = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Score all queries with the same demonstrations, running the shared prefix once.

    The prefix (BOS, the demonstrations and the separator before the query; only
    BOS for zero-shot) goes through the model once. Every query's tokens then run
    through a frozen copy of its key-value cache, at most ``batch_size``
    queries of similar length per pass.
    A query whose prompt does not start with the same tokens (a token merged
    across the boundary) or, under a custom mask, the same prefix mask block is
    scored in full instead, with a warning.

    Args: as ``score_prompts``, with one demonstration list for all queries.

    Returns:
        float64 scores, shape (n_queries,), in query order.
    """
    if not queries:
        raise ValueError("No queries to score.")
    _check_batch_size(batch_size)
    scorer = _make_scorer(model, task, metric, mask)
    prompts = [scorer.build(demos, query) for query in queries]
    allowed = scorer.allowed(prompts)
    prefix_length = prompts[0].span("query_input")[0]
    prefix_ids = prompts[0].input_ids[:prefix_length]

    shared = []
    for index, prompt in enumerate(prompts):
        same = np.array_equal(prompt.input_ids[:prefix_length], prefix_ids)
        if same and allowed is not None:
            same = np.array_equal(allowed[index][:prefix_length, :prefix_length],
                                  allowed[0][:prefix_length, :prefix_length])
        shared.append(same)
    use_cache = [bool(same) and prefix_length > 0 for same in shared]
    cached = [i for i, flag in enumerate(use_cache) if flag]
    full = [i for i, flag in enumerate(use_cache) if not flag]
    if full and prefix_length > 0:
        logger.warning("%d of %d queries do not share the demonstration prefix tokens; scoring them in full",
                       len(full), len(prompts))

    scores = np.empty(len(prompts), dtype=np.float64)
    groups: list[tuple[list[int], PrefixCache | None]] = []
    if cached:
        prefix_allowed = None if allowed is None else allowed[0][:prefix_length, :prefix_length]
        groups.append((cached, build_prefix_cache(model, prefix_ids, prefix_allowed)))
    if full:
        groups.append((full, None))
    for indices, prefix in groups:
        offset = 0 if prefix is None else prefix.length
        continuations = [prompts[i].input_ids[offset:] for i in indices]
        for batch in batches_by_length(continuations, batch_size, max_padding=MAX_PADDING):
            rows = [indices[i] for i in batch]
            scores[rows] = _score_batch(
                scorer, [prompts[i] for i in rows], [queries[i] for i in rows], prefix,
                None if allowed is None else [allowed[i] for i in rows],
            )
    return scores


def _score_batch(
    scorer: _Scorer, prompts: list[Prompt], queries: list[Example], prefix: PrefixCache | None,
    allowed: list[np.ndarray] | None,
) -> np.ndarray:
    """Score one batch of prompts (already validated), after ``prefix`` when given."""
    if scorer.metric == "exact_match":
        return _greedy_exact_match(scorer, prompts, queries, prefix, allowed)
    model = scorer.model
    offset = 0 if prefix is None else prefix.length
    residual = run_continuations(model, [p.input_ids[offset:] for p in prompts], scorer.pad_id, prefix, allowed)

    if scorer.metric in ("accuracy", "label_logprob"):
        logits = logits_at(model, residual, range(len(prompts)), [p.score_positions[0] - offset for p in prompts])
        labels = scorer.task.labels
        gold = torch.tensor([labels.index(query.label) for query in queries], device=logits.device)
        correct, logprob = label_metrics(logits, scorer.label_ids, gold)
        return correct if scorer.metric == "accuracy" else logprob

    # answer_logprob: every answer token at once, then one mean per prompt
    batch_index = [row for row, p in enumerate(prompts) for _ in p.score_positions]
    positions = [pos - offset for p in prompts for pos in p.score_positions]
    logits = logits_at(model, residual, batch_index, positions)
    targets = torch.tensor([t for p in prompts for t in p.answer_ids], device=logits.device)
    bounds = np.cumsum([0] + [len(p.answer_ids) for p in prompts])
    return np.array([
        mean_token_logprob(logits[bounds[r]:bounds[r + 1]], targets[bounds[r]:bounds[r + 1]])
        for r in range(len(prompts))
    ])


def extend_allowed(allowed: np.ndarray, n_new: int) -> np.ndarray:
    """Add ``n_new`` generated tokens to a (pos, pos) mask matrix.

    A generated token attends what the last prompt token attends, plus every
    generated token up to and including itself.
    """
    length = allowed.shape[0]
    out = np.zeros((length + n_new, length + n_new), dtype=bool)
    out[:length, :length] = allowed
    for step in range(n_new):
        out[length + step, :length] = allowed[length - 1]
        out[length + step, length:length + step + 1] = True
    return out


def _greedy_exact_match(
    scorer: _Scorer, prompts: list[Prompt], queries: list[Example], prefix: PrefixCache | None,
    allowed: list[np.ndarray] | None,
) -> np.ndarray:
    """Decode greedily and compare the first line of the continuation with the gold answer.

    A row stops at EOS, at a newline, or once its stripped text is longer than
    the stripped gold answer: text only grows, so its first line can no longer
    match. Each step re-runs the continuations with the tokens generated so far
    appended, so right padding never leaves a gap inside a row.
    """
    # TODO: decode one token per step through a growing cache; re-running the
    # continuation costs O(steps x length) instead of O(steps).
    model, tokenizer = scorer.model, scorer.model.tokenizer
    offset = 0 if prefix is None else prefix.length
    golds = [scorer.task.answer_text(query).strip() for query in queries]
    max_new = max(EXACT_MATCH_MIN_NEW_TOKENS, max(len(gold) for gold in golds) + EXACT_MATCH_EXTRA_TOKENS)
    base_rows = [p.input_ids[offset:] for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    eos = tokenizer.eos_token_id
    for _ in range(max_new):
        if not active:
            break
        rows = [np.concatenate([base_rows[i], np.asarray(generated[i], dtype=np.int64)]) for i in active]
        row_allowed = None
        if allowed is not None:
            row_allowed = [extend_allowed(allowed[i], len(generated[i])) for i in active]
        residual = run_continuations(model, rows, scorer.pad_id, prefix, row_allowed)
        logits = logits_at(model, residual, range(len(active)), [len(row) - 1 for row in rows])
        still_active = []
        for i, token in zip(active, logits.argmax(dim=-1).tolist()):
            if token == eos:
                continue
            generated[i].append(int(token))
            text = tokenizer.decode(generated[i])
            if "\n" not in text and len(text.strip()) <= len(golds[i]):
                still_active.append(i)
        active = still_active
    if active:
        logger.debug("%d continuations reached the cap of %d new tokens", len(active), max_new)
    texts = [tokenizer.decode(ids) for ids in generated]
    return np.array([exact_match(text, gold) for text, gold in zip(texts, golds)])
