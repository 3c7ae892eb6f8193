"""The model's own prediction on a candidate, for strategies that look at model outputs.

Uncertainty sampling needs the entropy of the model's answer distribution and
vote-k's second stage needs the model's confidence in its prediction. Both read
the next-token distribution at the last query-input token, whose logits predict
the first answer token. No gold label is used, so these work on unannotated
candidates.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from scipy.special import logsumexp
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.prompts import PromptBuilder, batches_by_length, collate
from actsel.selection.embeddings import pad_token_id
from actsel.tasks.base import Example, Task

logger = logging.getLogger(__name__)


def next_token_log_probs(
    model: HookedTransformer,
    task: Task,
    demos_per_query: Sequence[Sequence[Example]],
    queries: Sequence[Example],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> Float[np.ndarray, "batch d_vocab"]:
    """Return the log-softmax over the vocabulary at each query's answer position.

    Args:
        model: the model to run.
        task: renders prompts.
        demos_per_query: demonstrations before each query (may be empty lists).
        queries: the candidates whose answers the model predicts.
        batch_size: prompts per forward pass.
        progress: show a progress bar.

    Returns:
        float64 array of shape (n_queries, d_vocab).
    """
    if len(demos_per_query) != len(queries):
        raise ValueError(f"{len(demos_per_query)} demonstration lists for {len(queries)} queries; pass one per query.")
    builder = PromptBuilder(task, model.tokenizer, prepend_bos=True, max_tokens=model.cfg.n_ctx,
                            truncation="drop_demos")
    prompts = [builder.build(list(demos), query) for demos, query in zip(demos_per_query, queries)]
    out = np.zeros((len(prompts), model.cfg.d_vocab), dtype=np.float64)
    for group in tqdm(batches_by_length(prompts, batch_size), desc="predict", disable=not progress):
        batch = collate([prompts[i] for i in group], pad_token_id(model), device=model.cfg.device)
        with torch.no_grad():
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
        rows = torch.arange(len(group), device=logits.device)
        positions = torch.tensor([prompts[i].score_positions[0] for i in group], device=logits.device)
        picked = logits[rows, positions].to(torch.float64)  # (batch, d_vocab)
        out[group] = torch.log_softmax(picked, dim=-1).cpu().numpy()
    return out


def prediction_entropy(model: HookedTransformer, task: Task, demos_per_query: Sequence[Sequence[Example]],
                       queries: Sequence[Example], *, batch_size: int = 16,
                       progress: bool = False) -> Float[np.ndarray, "batch"]:
    """Return the entropy (nats) of the model's answer distribution for each query.

    For classification the distribution is the softmax over the first tokens of
    the label words only. For generation it is the full next-token distribution
    at the answer position.
    """
    log_probs = next_token_log_probs(model, task, demos_per_query, queries, batch_size=batch_size,
                                     progress=progress)
    if task.kind == "classification":
        label_log_probs = log_probs[:, task.label_token_ids(model.tokenizer)]
        log_probs = label_log_probs - logsumexp(label_log_probs, axis=1, keepdims=True)
    return -(np.exp(log_probs) * log_probs).sum(axis=1)


def prediction_confidence(model: HookedTransformer, task: Task, demos_per_query: Sequence[Sequence[Example]],
                          queries: Sequence[Example], *, batch_size: int = 16,
                          progress: bool = False) -> Float[np.ndarray, "batch"]:
    """Return the log-probability of the model's predicted answer token for each query.

    For classification the prediction is the label word whose first token has
    the highest logit, and the confidence is that token's log-probability under
    the full vocabulary. For generation it is the greedy first token's
    log-probability.

    NOTE: Su et al. (2022) average the log-probability over all tokens of the
    prediction. Label words whose first token already decides the class make
    that the same for classification. For generation only the first token is
    scored here, not a greedy decode of the whole answer.
    """
    log_probs = next_token_log_probs(model, task, demos_per_query, queries, batch_size=batch_size,
                                     progress=progress)
    if task.kind == "classification":
        return log_probs[:, task.label_token_ids(model.tokenizer)].max(axis=1)
    return log_probs.max(axis=1)
