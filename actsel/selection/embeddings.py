"""Example embeddings for similarity-based selection and retrieval.

An embedding function maps examples to a float64 array of shape
``(n_examples, d)``. The default is the model's own representation: the mean of
``blocks.{last}.hook_resid_post`` over the real tokens of the rendered input,
BOS excluded. BOS is the attention sink and carries massive activations in
SmolLM2 (about 2.2e4 in one dimension from block 11 on, about 4.4e3 at the
last block), which would pull the mean of a short input toward BOS. Any other callable with the same signature can be passed instead,
for example a sentence-embedding model.

``EmbeddingCache`` stores vectors by uid so that selection and retrieval reuse
one forward pass per example.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from actsel.prompts import PromptBuilder, batches_by_length, collate
from actsel.tasks.base import Example, Task

logger = logging.getLogger(__name__)

EmbeddingFn = Callable[[Sequence[Example]], Float[np.ndarray, "batch d_model"]]


def pad_token_id(model: HookedTransformer) -> int:
    """Return the id used for right padding: the tokenizer's pad token, else its EOS token."""
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token_id.")


def mean_pooled_embeddings(
    model: HookedTransformer,
    task: Task,
    examples: Sequence[Example],
    *,
    layer: int | None = None,
    hook: str = "hook_resid_post",
    batch_size: int = 16,
    progress: bool = False,
) -> Float[np.ndarray, "batch d_model"]:
    """Embed each example's rendered input as the mean of one residual hook over its tokens.

    Each example is tokenized as ``[BOS] input`` (no label, so the embedding
    needs no annotation). The mean runs over the input tokens only: BOS and
    padding are excluded, and the attention mask is passed explicitly because
    SmolLM2's pad token is also its EOS token.

    Args:
        model: the model whose activations embed the examples.
        task: renders the examples.
        examples: the examples to embed.
        layer: block index; ``None`` for the last block.
        hook: hook name inside the block, for example ``"hook_resid_post"``.
        batch_size: prompts per forward pass.
        progress: show a progress bar.

    Returns:
        float64 array of shape (n_examples, d_model), rows in ``examples`` order.
    """
    n_layers = model.cfg.n_layers
    layer = n_layers - 1 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range; the model has layers 0..{n_layers - 1}.")
    name = f"blocks.{layer}.{hook}"
    if name not in model.hook_dict:
        raise ValueError(f"Hook {name!r} does not exist; use a hook point inside a block, e.g. 'hook_resid_post'.")
    if not examples:
        return np.zeros((0, model.cfg.d_model), dtype=np.float64)

    builder = PromptBuilder(task, model.tokenizer, prepend_bos=True, max_tokens=model.cfg.n_ctx)
    prompts = [builder.build([], example) for example in examples]
    out: np.ndarray | None = None
    device = model.cfg.device
    groups = batches_by_length(prompts, batch_size)
    for group in tqdm(groups, desc="embed", disable=not progress):
        batch = collate([prompts[i] for i in group], pad_token_id(model), device=device)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                            names_filter=name, return_type=None)
        acts = cache[name].to(torch.float64)  # (batch, pos, d)
        weights = batch.attention_mask.to(torch.float64).clone()
        weights[:, 0] = 0.0  # BOS is position 0 of every prompt
        pooled = (acts * weights[:, :, None]).sum(dim=1) / weights.sum(dim=1, keepdim=True)
        if out is None:
            out = np.zeros((len(prompts), pooled.shape[-1]), dtype=np.float64)
        out[group] = pooled.cpu().numpy()
    return out


def default_embedding_fn(model: HookedTransformer, task: Task, *, batch_size: int = 16,
                         progress: bool = False) -> EmbeddingFn:
    """Return the default embedding function: mean-pooled ``hook_resid_post`` of the last block."""

    def embed(examples: Sequence[Example]) -> np.ndarray:
        return mean_pooled_embeddings(model, task, examples, batch_size=batch_size, progress=progress)

    return embed


class EmbeddingCache:
    """Embeddings by uid, computed on first request with ``embed_fn``.

    The cache assumes a uid always names the same example text.
    """

    def __init__(self, embed_fn: EmbeddingFn) -> None:
        self.embed_fn = embed_fn
        self._vectors: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, examples: Sequence[Example]) -> Float[np.ndarray, "batch d_model"]:
        """Return the embeddings of ``examples`` (rows in order), computing the missing ones in one call."""
        missing: list[Example] = []
        seen: set[str] = set()
        for example in examples:
            if example.uid not in self._vectors and example.uid not in seen:
                missing.append(example)
                seen.add(example.uid)
        if missing:
            vectors = np.asarray(self.embed_fn(missing), dtype=np.float64)
            if vectors.ndim != 2 or vectors.shape[0] != len(missing):
                raise ValueError(
                    f"The embedding function returned shape {vectors.shape} for {len(missing)} examples; "
                    f"expected ({len(missing)}, d)."
                )
            for example, vector in zip(missing, vectors):
                self._vectors[example.uid] = vector
        if not examples:
            return np.zeros((0, 0), dtype=np.float64)
        return np.stack([self._vectors[example.uid] for example in examples])


def cosine_similarity_matrix(a: Float[np.ndarray, "n d"], b: Float[np.ndarray, "m d"]) -> Float[np.ndarray, "n m"]:
    """Return cosine similarities between the rows of ``a`` and ``b``; a zero row has similarity 0."""
    a_norm = np.linalg.norm(a, axis=1, keepdims=True)
    b_norm = np.linalg.norm(b, axis=1, keepdims=True)
    a_unit = np.divide(a, a_norm, out=np.zeros_like(a), where=a_norm > 0)
    b_unit = np.divide(b, b_norm, out=np.zeros_like(b), where=b_norm > 0)
    return a_unit @ b_unit.T
