"""k-shot prompts with token-level segment maps, and padded batches."""

from actsel.prompts.batch import Batch, batches_by_length, collate
from actsel.prompts.builder import (
    ROLE_BOS,
    ROLE_DEMO_INPUT,
    ROLE_DEMO_LABEL,
    ROLE_NAMES,
    ROLE_QUERY_ANSWER,
    ROLE_QUERY_INPUT,
    ROLE_SEPARATOR,
    Prompt,
    PromptBuilder,
    PromptTooLongError,
    Segment,
    build_prompt,
)

__all__ = [
    "Batch", "Prompt", "PromptBuilder", "PromptTooLongError", "Segment", "batches_by_length", "build_prompt",
    "collate", "ROLE_BOS", "ROLE_DEMO_INPUT", "ROLE_DEMO_LABEL", "ROLE_NAMES", "ROLE_QUERY_ANSWER",
    "ROLE_QUERY_INPUT", "ROLE_SEPARATOR",
]
