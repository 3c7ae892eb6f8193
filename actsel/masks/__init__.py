"""Attention-masking strategies and the hook that applies them during a forward pass."""

from actsel.masks.hooks import masked_attention
from actsel.masks.strategies import MASK_STRATEGIES, allowed_matrix, batch_allowed, register_mask

__all__ = ["MASK_STRATEGIES", "allowed_matrix", "batch_allowed", "masked_attention", "register_mask"]
