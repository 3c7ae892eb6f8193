"""User tasks from CSV, JSONL or parquet files, or a Hugging Face hub dataset id.

Files are read with ``datasets.load_dataset`` so every format it reads works the
same way; a column mapping names the text fields and the label column.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Mapping, Sequence

from actsel.tasks.base import Example, Task, TaskKind

logger = logging.getLogger(__name__)

FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _read_split(source: str, split: str | None) -> list[dict]:
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.suffix in FILE_FORMATS or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"Task file not found: {path}.")
        if path.suffix not in FILE_FORMATS:
            raise ValueError(f"Task file {path} has an unknown extension; valid: {sorted(FILE_FORMATS)}.")
        kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
        dataset = load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train", **kwargs)
    else:
        try:
            dataset = load_dataset(source, split=split)
        except Exception as err:  # datasets raises many types for a missing or unreachable dataset
            offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = " The hub is switched off (HF_HUB_OFFLINE=1) and the local cache does not hold it." if offline else ""
            raise RuntimeError(
                f"Could not load the dataset {source!r} (split {split!r}) from a file or the hub.{hint} "
                f"Pass the path of a CSV, JSONL or parquet file, or a hub id that is cached."
            ) from err
    return [dict(row) for row in dataset]


def task_from_rows(
    name: str,
    pool_rows: Sequence[Mapping],
    eval_rows: Sequence[Mapping],
    *,
    kind: TaskKind,
    text_columns: Sequence[str],
    label_column: str,
    input_template: str | None = None,
    verbalizer: Mapping[str, str] | None = None,
    answer_prefix: str = " ",
    separator: str = "\n\n",
) -> Task:
    """Build a task from rows (dicts) of a pool and an evaluation split."""
    for split_name, rows in (("pool", pool_rows), ("eval", eval_rows)):
        if not rows:
            raise ValueError(f"Task {name!r}: the {split_name} split is empty.")
        columns = set(rows[0])
        for column in [*text_columns, label_column]:
            if column not in columns:
                raise KeyError(
                    f"Task {name!r}: column {column!r} is missing from the {split_name} split; "
                    f"available columns: {sorted(columns)}."
                )
    if input_template is None:
        input_template = "\n".join(f"{column.capitalize()}: {{{column}}}" for column in text_columns) + "\nAnswer:"

    def convert(rows: Sequence[Mapping], split_name: str) -> list[Example]:
        return [
            Example({column: str(row[column]) for column in text_columns}, str(row[label_column]), f"{name}/{split_name}/{i}")
            for i, row in enumerate(rows)
        ]

    pool = convert(pool_rows, "pool")
    evaluation = convert(eval_rows, "eval")
    if kind == "classification" and verbalizer is None:
        labels = sorted({example.label for example in pool})
        verbalizer = {label: label for label in labels}
        logger.info("Task %s: no verbalizer given, using the label values as words: %s", name, labels)
    return Task(
        name=name,
        kind=kind,
        pool=pool,
        eval=evaluation,
        input_template=input_template,
        verbalizer=dict(verbalizer) if verbalizer is not None else None,
        answer_prefix=answer_prefix,
        separator=separator,
        description=f"User task {name}.",
    )


def load_task_from_files(
    pool: str | os.PathLike,
    eval: str | os.PathLike | None = None,
    *,
    kind: TaskKind = "classification",
    text_columns: Sequence[str] = ("text",),
    label_column: str = "label",
    input_template: str | None = None,
    verbalizer: Mapping[str, str] | None = None,
    name: str | None = None,
    pool_split: str = "train",
    eval_split: str = "test",
    eval_fraction: float = 0.5,
    seed: int = 0,
    answer_prefix: str = " ",
) -> Task:
    """Load a user task from files or a hub id.

    Args:
        pool: path of a CSV, TSV, JSONL or parquet file, or a hub dataset id.
        eval: a second file or hub id for the evaluation split. With a hub id in
            ``pool`` and no ``eval``, ``eval_split`` of the same dataset is used;
            with a file and no ``eval``, the file is shuffled with ``seed`` and cut
            into disjoint pool and evaluation parts (``eval_fraction`` to eval).
        text_columns: columns that the template can use.
        label_column: the class name (classification) or answer (generation).
        input_template: ``str.format`` template over ``text_columns``; a
            ``Column: {column}`` line per column ending in ``Answer:`` by default.
        verbalizer: class name to word; the label values themselves by default.
    """
    pool_source = str(pool)
    name = name or Path(pool_source).stem
    pool_rows = _read_split(pool_source, pool_split)
    if eval is not None:
        eval_rows = _read_split(str(eval), eval_split)
    elif not Path(pool_source).expanduser().exists():
        eval_rows = _read_split(pool_source, eval_split)
    else:
        if not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be between 0 and 1, got {eval_fraction}.")
        order = list(range(len(pool_rows)))
        random.Random(seed).shuffle(order)
        cut = int(round(len(order) * (1.0 - eval_fraction)))
        eval_rows = [pool_rows[i] for i in sorted(order[cut:])]
        pool_rows = [pool_rows[i] for i in sorted(order[:cut])]
    return task_from_rows(
        name,
        pool_rows,
        eval_rows,
        kind=kind,
        text_columns=text_columns,
        label_column=label_column,
        input_template=input_template,
        verbalizer=verbalizer,
        answer_prefix=answer_prefix,
    )
