"""k-shot prompts as token ids with a token-level segment map.

A prompt is ``[BOS] demo_1 sep demo_2 sep ... demo_k sep query [answer]`` where
each demonstration is its rendered input followed by its label text. Every
piece is tokenized on its own and the ids are concatenated, so segment
boundaries fall exactly on token boundaries and a demonstration has the same
tokens inside a prompt as alone. Pieces meet at whitespace, where byte-level BPE
pre-tokenizers split anyway, so the result equals tokenizing the joined text
(``tests/test_prompts.py`` checks this on every built-in task).

Masks, pooling and scoring downstream read the segment map: ``Segment`` spans
with a role and the demonstration they belong to, and per-token ``roles`` and
``demo_index`` arrays.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from actsel.tasks.base import Example, Task

logger = logging.getLogger(__name__)

# Role codes of the per-token ``roles`` array.
ROLE_BOS = 0
ROLE_DEMO_INPUT = 1
ROLE_DEMO_LABEL = 2
ROLE_SEPARATOR = 3
ROLE_QUERY_INPUT = 4
ROLE_QUERY_ANSWER = 5
ROLE_NAMES = {
    ROLE_BOS: "bos",
    ROLE_DEMO_INPUT: "demo_input",
    ROLE_DEMO_LABEL: "demo_label",
    ROLE_SEPARATOR: "separator",
    ROLE_QUERY_INPUT: "query_input",
    ROLE_QUERY_ANSWER: "query_answer",
}
TRUNCATION_MODES = ("error", "drop_demos")


class PromptTooLongError(ValueError):
    """A prompt does not fit in the model's context."""


@dataclass(frozen=True)
class Segment:
    """A contiguous token span ``[start, end)`` with one role.

    ``demo`` is the demonstration's index for demonstration inputs, labels and
    the separator that follows them, and ``None`` for BOS and the query.
    """

    role: str
    start: int
    end: int
    text: str
    demo: int | None = None

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class Prompt:
    """Token ids of one prompt with its segment map.

    Attributes:
        input_ids: token ids, shape (pos,).
        segments: spans in order; they tile ``[0, len(input_ids))``.
        roles: role code per token, shape (pos,).
        demo_index: demonstration index per token, -1 outside demonstrations.
        score_positions: positions whose next-token logits predict the answer:
            the last query-input token, then each answer token but the last when
            the answer is included.
        answer_ids: the answer's token ids when included, else empty.
        demo_uids, query_uid: ids of the examples used.
    """

    input_ids: np.ndarray
    segments: list[Segment]
    roles: np.ndarray
    demo_index: np.ndarray
    score_positions: list[int]
    answer_ids: list[int]
    demo_uids: list[str]
    query_uid: str | None
    dropped_demos: int = 0
    text: str = field(default="", repr=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_demos(self) -> int:
        return len(self.demo_uids)

    def demo_span(self, index: int, part: str = "example") -> tuple[int, int]:
        """Token span of demonstration ``index``.

        ``part`` is ``"input"``, ``"label"``, ``"example"`` (input and label) or
        ``"block"`` (input, label and the separator after it).
        """
        parts = {
            "input": ("demo_input",),
            "label": ("demo_label",),
            "example": ("demo_input", "demo_label"),
            "block": ("demo_input", "demo_label", "separator"),
        }
        if part not in parts:
            raise ValueError(f"Unknown demonstration part {part!r}; valid: {sorted(parts)}.")
        spans = [s for s in self.segments if s.demo == index and s.role in parts[part]]
        if not spans:
            raise IndexError(f"Prompt has no demonstration {index} (it has {self.n_demos}).")
        return spans[0].start, spans[-1].end

    def span(self, role: str) -> tuple[int, int]:
        """Token span of the first segment with ``role`` (``"query_input"``, ``"bos"``, ...)."""
        for segment in self.segments:
            if segment.role == role:
                return segment.start, segment.end
        raise KeyError(f"Prompt has no {role!r} segment.")


class PromptBuilder:
    """Build prompts for one task and tokenizer, reusing the tokenization of repeated pieces.

    Args:
        task: the task whose templates render the examples.
        tokenizer: an HF tokenizer.
        prepend_bos: put the tokenizer's BOS token first. It then takes the
            attention-sink role that the first token always plays.
        max_tokens: context limit, usually ``model.cfg.n_ctx``; ``None`` for none.
        truncation: ``"error"`` raises ``PromptTooLongError`` when a prompt is
            longer than ``max_tokens``; ``"drop_demos"`` drops demonstrations from
            the start until it fits. The query is never cut.
    """

    def __init__(self, task: Task, tokenizer, *, prepend_bos: bool = True, max_tokens: int | None = None,
                 truncation: str = "error") -> None:
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"Unknown truncation {truncation!r}; valid: {TRUNCATION_MODES}.")
        if prepend_bos and tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token; pass prepend_bos=False.")
        self.task = task
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        self.max_tokens = max_tokens
        self.truncation = truncation
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("PromptBuilder needs a fast (Rust) HF tokenizer, which reports token offsets.")
        if task.kind == "classification":
            # Fails early on verbalizers whose words share a first token.
            self.label_token_ids = task.label_token_ids(tokenizer)

    def build(self, demos: Sequence[Example], query: Example | None = None, *, include_answer: bool = False) -> Prompt:
        """Build ``demos`` followed by ``query`` (or demonstrations only when ``query`` is None)."""
        demos = list(demos)
        prompt = self._assemble(demos, query, include_answer)
        dropped = 0
        while self.max_tokens is not None and len(prompt) > self.max_tokens:
            if self.truncation == "error" or not demos:
                raise PromptTooLongError(
                    f"Prompt of {len(prompt)} tokens ({len(demos)} demonstrations) exceeds the context of "
                    f"{self.max_tokens} tokens. Use fewer or shorter demonstrations, or truncation='drop_demos'"
                    + (" (the query alone is too long, so it cannot help here)." if not demos else ".")
                )
            demos = demos[1:]
            dropped += 1
            prompt = self._assemble(demos, query, include_answer)
        if dropped:
            logger.info("Dropped %d leading demonstrations to fit %d tokens", dropped, self.max_tokens)
            prompt.dropped_demos = dropped
        return prompt

    def _assemble(self, demos: list[Example], query: Example | None, include_answer: bool) -> Prompt:
        task = self.task
        pieces: list[tuple[str, str, int | None]] = []  # (role, text, demo index)
        for index, demo in enumerate(demos):
            pieces.append(("demo_input", task.render_input(demo), index))
            pieces.append(("demo_label", task.answer_text(demo), index))
            if query is not None or index < len(demos) - 1:
                pieces.append(("separator", task.separator, index))
        if query is not None:
            pieces.append(("query_input", task.render_input(query), None))
            if include_answer:
                pieces.append(("query_answer", task.answer_text(query), None))

        text = "".join(piece_text for _, piece_text, _ in pieces)
        char_starts = np.cumsum([0] + [len(piece_text) for _, piece_text, _ in pieces])
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        body_ids = list(encoded["input_ids"])
        # A token belongs to the piece that contains its first character. Pieces
        # meet at whitespace, so no token should cross a boundary; one that does
        # is counted and reported rather than split.
        token_starts = np.asarray([start for start, _ in encoded["offset_mapping"]], dtype=np.int64)
        piece_of_token = np.searchsorted(char_starts, token_starts, side="right") - 1
        offset = 0
        ids: list[int] = []
        segments: list[Segment] = []
        if self.prepend_bos:
            ids.append(self.tokenizer.bos_token_id)
            segments.append(Segment("bos", 0, 1, self.tokenizer.bos_token))
            offset = 1
        ids.extend(body_ids)
        bounds = np.searchsorted(piece_of_token, np.arange(len(pieces) + 1), side="left")
        for index, (role, piece_text, demo) in enumerate(pieces):
            start, end = int(bounds[index]) + offset, int(bounds[index + 1]) + offset
            if end <= start:
                raise ValueError(
                    f"The {role} text {piece_text!r} has no token of its own (empty, or merged into a "
                    f"neighbouring token); check the template and separator."
                )
            segments.append(Segment(role, start, end, piece_text, demo))
        crossing = sum(
            1 for token_start, (_, token_end) in zip(token_starts, encoded["offset_mapping"])
            if np.any((char_starts[1:-1] > token_start) & (char_starts[1:-1] < token_end))
        )
        if crossing:
            logger.warning("%d token(s) cross a segment boundary in a %s prompt; each was given to the segment "
                           "where it starts", crossing, self.task.name)

        roles = np.empty(len(ids), dtype=np.int8)
        demo_index = np.full(len(ids), -1, dtype=np.int32)
        codes = {name: code for code, name in ROLE_NAMES.items()}
        for segment in segments:
            roles[segment.start:segment.end] = codes[segment.role]
            if segment.demo is not None:
                demo_index[segment.start:segment.end] = segment.demo

        score_positions: list[int] = []
        answer_ids: list[int] = []
        if query is not None:
            query_end = next(s.end for s in segments if s.role == "query_input")
            score_positions.append(query_end - 1)
            if include_answer:
                answer = segments[-1]
                answer_ids = ids[answer.start:answer.end]
                score_positions.extend(range(answer.start, answer.end - 1))
        return Prompt(
            input_ids=np.asarray(ids, dtype=np.int64),
            segments=segments,
            roles=roles,
            demo_index=demo_index,
            score_positions=score_positions,
            answer_ids=list(answer_ids),
            demo_uids=[demo.uid for demo in demos],
            query_uid=query.uid if query is not None else None,
            text=text,
        )


def build_prompt(task: Task, demos: Sequence[Example], query: Example | None, tokenizer, *,
                 include_answer: bool = False, prepend_bos: bool = True, max_tokens: int | None = None,
                 truncation: str = "error") -> Prompt:
    """Build one k-shot prompt; see ``PromptBuilder`` for the arguments."""
    builder = PromptBuilder(task, tokenizer, prepend_bos=prepend_bos, max_tokens=max_tokens, truncation=truncation)
    return builder.build(demos, query, include_answer=include_answer)
