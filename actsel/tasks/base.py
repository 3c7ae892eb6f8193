"""The ``Task``: a candidate pool, an evaluation split, and how to render them as text.

Every example renders as ``input_template.format(**fields)`` followed by its
answer, ``answer_prefix + answer``. For classification the answer is the
verbalizer's word for the label; for generation it is the gold answer text. A
k-shot prompt joins rendered demonstrations with ``separator`` and ends with the
query's input, so the model predicts the answer next.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field, replace
from typing import Literal, Mapping, Sequence

TaskKind = Literal["classification", "generation"]
TASK_KINDS = ("classification", "generation")


@dataclass(frozen=True)
class Example:
    """One labelled example: its text fields, its label (class name or answer) and a stable id."""

    fields: Mapping[str, str]
    label: str
    uid: str


@dataclass
class Task:
    """A task ready for k-shot prompting.

    Attributes:
        name: short name, for example ``"sst2"``.
        kind: ``"classification"`` or ``"generation"``.
        pool: candidate demonstrations.
        eval: evaluation queries, disjoint from the pool.
        input_template: ``str.format`` template over an example's fields,
            for example ``"Review: {text}\\nSentiment:"``.
        verbalizer: for classification, the word for each class name; the
            answer is ``answer_prefix + word``. ``None`` for generation.
        answer_prefix: text between the input and the answer, a space by default
            so the answer starts a new word token.
        separator: text between demonstrations and before the query.
        description: one line on the source and split of the data.
    """

    name: str
    kind: TaskKind
    pool: list[Example]
    eval: list[Example]
    input_template: str
    verbalizer: dict[str, str] | None = None
    answer_prefix: str = " "
    separator: str = "\n\n"
    description: str = ""
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Task {self.name!r}: kind {self.kind!r} is invalid; valid kinds: {TASK_KINDS}.")
        for split_name, split in (("pool", self.pool), ("eval", self.eval)):
            if not split:
                raise ValueError(f"Task {self.name!r}: the {split_name} split is empty; check the data files.")
        template_fields = {name for _, name, _, _ in string.Formatter().parse(self.input_template) if name}
        example_fields = set(self.pool[0].fields)
        missing = template_fields - example_fields
        if missing:
            raise ValueError(
                f"Task {self.name!r}: input template {self.input_template!r} uses {sorted(missing)}, "
                f"which the examples do not have; available fields: {sorted(example_fields)}."
            )
        if self.kind == "classification":
            if not self.verbalizer:
                raise ValueError(f"Task {self.name!r}: a classification task needs a verbalizer (class name -> word).")
            for split_name, split in (("pool", self.pool), ("eval", self.eval)):
                for example in split:
                    if example.label not in self.verbalizer:
                        raise ValueError(
                            f"Task {self.name!r}: example {example.uid} in the {split_name} split has label "
                            f"{example.label!r}, which is not in the verbalizer {sorted(self.verbalizer)}. "
                            f"Add it to the verbalizer or fix the label column."
                        )

    @property
    def labels(self) -> list[str]:
        """Class names in verbalizer order (empty for generation)."""
        return list(self.verbalizer) if self.verbalizer else []

    def render_input(self, example: Example) -> str:
        return self.input_template.format(**example.fields)

    def answer_text(self, example: Example) -> str:
        """Return the answer text as it follows the input in a prompt, prefix included."""
        if self.kind == "classification":
            return self.answer_prefix + self.verbalizer[example.label]
        return self.answer_prefix + example.label

    def label_words(self) -> list[str]:
        """Each class's answer text (prefix included), in ``labels`` order."""
        return [self.answer_prefix + self.verbalizer[label] for label in self.labels]

    def label_token_ids(self, tokenizer) -> list[int]:
        """First token of each class's answer text; raises when two classes share it.

        Classification is scored by comparing the logits of these tokens at the
        answer position, so they must be distinct.
        """
        first_ids = []
        for word in self.label_words():
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"Task {self.name!r}: label word {word!r} tokenizes to nothing.")
            first_ids.append(ids[0])
        seen: dict[int, str] = {}
        for word, token_id in zip(self.label_words(), first_ids):
            if token_id in seen:
                raise ValueError(
                    f"Task {self.name!r}: label words {seen[token_id]!r} and {word!r} start with the same token "
                    f"{tokenizer.convert_ids_to_tokens(token_id)!r}; choose verbalizer words whose first tokens differ."
                )
            seen[token_id] = word
        return first_ids

    def subsample(self, n_pool: int | None = None, n_eval: int | None = None, seed: int = 0) -> "Task":
        """Return a copy with at most ``n_pool`` pool and ``n_eval`` eval examples, drawn with ``seed``.

        Draws keep the original order of the examples they keep, so a larger
        draw with the same seed does not reorder a smaller one's examples.
        """
        rng = random.Random(seed)

        def draw(examples: Sequence[Example], n: int | None) -> list[Example]:
            if n is None or n >= len(examples):
                return list(examples)
            if n <= 0:
                raise ValueError(f"Task {self.name!r}: cannot draw {n} examples; pass a positive number.")
            keep = sorted(rng.sample(range(len(examples)), n))
            return [examples[i] for i in keep]

        return replace(self, pool=draw(self.pool, n_pool), eval=draw(self.eval, n_eval))
