"""Per-query metrics of an in-context prediction, computed from next-token logits.

Classification metrics read the logits at the last query-input token and
compare the first tokens of the label words (``Task.label_token_ids``):

- ``accuracy``: 1 when the gold label's token has the largest logit among the
  label tokens, else 0.
- ``label_logprob``: the gold label's log-probability after a softmax restricted
  to the label tokens.

Metrics for any task kind:

- ``answer_logprob``: the mean log-probability (softmax over the whole
  vocabulary) of the gold answer's tokens, read at the positions that predict
  them in a prompt built with ``include_answer=True``.
- ``exact_match``: 1 when the greedy continuation, cut at its first newline and
  stripped, equals the stripped gold answer text, else 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float, Int

from actsel.tasks.base import Task

METRICS = ("accuracy", "label_logprob", "answer_logprob", "exact_match")
CLASSIFICATION_ONLY_METRICS = ("accuracy", "label_logprob")


def default_metric(task: Task) -> str:
    """Return ``"accuracy"`` for classification tasks and ``"answer_logprob"`` for generation tasks."""
    return "accuracy" if task.kind == "classification" else "answer_logprob"


def check_metric(task: Task, metric: str) -> None:
    """Raise ``ValueError`` unless ``metric`` is known and defined for ``task``'s kind."""
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; valid: {METRICS}.")
    if metric in CLASSIFICATION_ONLY_METRICS and task.kind != "classification":
        valid = [name for name in METRICS if name not in CLASSIFICATION_ONLY_METRICS]
        raise ValueError(
            f"Metric {metric!r} needs label words, but task {task.name!r} is a {task.kind} task; valid: {valid}."
        )


def label_metrics(
    logits: Float[torch.Tensor, "batch d_vocab"], label_ids: Sequence[int], gold: Int[torch.Tensor, "batch"]
) -> tuple[np.ndarray, np.ndarray]:
    """Compute ``accuracy`` and ``label_logprob`` per row.

    Args:
        logits: next-token logits at each query's answer position.
        label_ids: first token of each label word, in ``Task.labels`` order.
        gold: index of each query's gold label in ``label_ids``.

    Returns:
        ``(accuracy, label_logprob)``, each float64 of shape (batch,).
    """
    restricted = logits[:, list(label_ids)].double()  # (batch, n_labels)
    correct = (restricted.argmax(dim=-1) == gold).double()
    logprob = torch.log_softmax(restricted, dim=-1).gather(1, gold[:, None])[:, 0]
    return correct.cpu().numpy(), logprob.cpu().numpy()


def mean_token_logprob(logits: Float[torch.Tensor, "n d_vocab"], targets: Int[torch.Tensor, "n"]) -> float:
    """Return the mean log-probability of ``targets``, where row i of ``logits`` predicts ``targets[i]``."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(logprobs.gather(1, targets[:, None]).mean())


def first_line(text: str) -> str:
    """Return ``text`` up to its first newline, stripped of surrounding whitespace."""
    return text.split("\n", 1)[0].strip()


def exact_match(generated: str, gold: str) -> float:
    """Return 1.0 when the first line of ``generated`` equals ``gold``, both stripped, else 0.0."""
    return float(first_line(generated) == gold.strip())
