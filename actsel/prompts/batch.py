"""Right-padded batches of prompts with explicit attention masks.

Batches are padded on the right, so every prompt keeps positions 0..len-1 and
its rotary phases match an unpadded run. The attention mask comes from the
prompt lengths, never from pad ids: SmolLM2's pad token is also its EOS token,
which can appear inside real text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Int

from actsel.prompts.builder import Prompt


@dataclass
class Batch:
    """Prompts padded to one length.

    Attributes:
        tokens: token ids, shape (batch, pos); padding holds ``pad_id``.
        attention_mask: 1 on real tokens and 0 on padding, shape (batch, pos).
        lengths: real length of each prompt.
        prompts: the prompts, in batch order.
    """

    tokens: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    lengths: list[int]
    prompts: list[Prompt]

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.attention_mask.to(device), self.lengths, self.prompts)


def collate(prompts: Sequence[Prompt], pad_id: int, device: str | torch.device = "cpu") -> Batch:
    """Stack ``prompts`` into a right-padded batch."""
    if not prompts:
        raise ValueError("Cannot collate an empty list of prompts.")
    lengths = [len(prompt) for prompt in prompts]
    width = max(lengths)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : lengths[row]] = torch.from_numpy(prompt.input_ids)
        attention_mask[row, : lengths[row]] = 1
    return Batch(tokens.to(device), attention_mask.to(device), lengths, list(prompts))


def batches_by_length(prompts: Sequence, batch_size: int, max_padding: float | None = None) -> list[list[int]]:
    """Group prompt indices into batches of similar length to keep padding small.

    Args:
        prompts: anything with a length (prompts, token arrays).
        batch_size: maximum number of prompts per batch.
        max_padding: if set, also start a new batch before padding would make
            up more than this fraction of a batch's positions. On a CPU the
            cost of a forward pass grows with the padded positions while a
            smaller batch costs little, so short and long prompts are better
            kept apart.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    if max_padding is not None and not 0 <= max_padding < 1:
        raise ValueError(f"max_padding must be in [0, 1), got {max_padding}.")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    if max_padding is None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        length = len(prompts[index])
        grown = len(current) + 1
        # Sorted ascending, so the newcomer sets the batch width.
        if current and (len(current) == batch_size or 1 - (real + length) / (length * grown) > max_padding):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += length
    batches.append(current)
    return batches
