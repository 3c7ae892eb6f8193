"""Task names to loaders, and ``load_task``."""

from __future__ import annotations

import difflib
import os
from typing import Callable

from actsel.tasks import builtin
from actsel.tasks.base import Task

# Loaders that read the data folder; "demo" ships with the package and needs none.
DATA_TASKS: dict[str, Callable] = {
    "sst2": builtin.load_sst2,
    "trec": builtin.load_trec,
    "agnews": builtin.load_agnews,
    "cb": builtin.load_cb,
    "rte": builtin.load_rte,
    "mit-movies": builtin.load_mit_movies,
    "lama-P19": lambda data_dir: builtin.load_lama(data_dir, "P19"),
    "lama-P36": lambda data_dir: builtin.load_lama(data_dir, "P36"),
    "lama-P176": lambda data_dir: builtin.load_lama(data_dir, "P176"),
}
TASK_NAMES = ["demo", *DATA_TASKS]


def list_tasks() -> list[str]:
    """Names ``load_task`` accepts. ``mit-movies:<Slot>`` picks another slot than Genre."""
    return list(TASK_NAMES)


def load_task(name: str, data_dir: str | os.PathLike | None = None) -> Task:
    """Load a built-in task by name.

    Args:
        name: one of ``list_tasks()``; ``"mit-movies:Director"`` selects another
            MIT Movies slot (Genre by default).
        data_dir: folder with the task files; ``$ACTSEL_DATA_DIR`` when omitted.
            Not used by ``"demo"``.

    For your own files or a hub id use ``actsel.tasks.load_task_from_files``.
    """
    if name == "demo":
        return builtin.load_demo()
    base, _, option = name.partition(":")
    if base not in DATA_TASKS:
        close = difflib.get_close_matches(name, TASK_NAMES, n=3)
        raise ValueError(
            f"Unknown task {name!r}. Valid tasks: {TASK_NAMES}."
            + (f" Did you mean {close[0]!r}?" if close else "")
            + " For your own data use load_task_from_files."
        )
    folder = builtin.resolve_data_dir(data_dir)
    if base == "mit-movies" and option:
        return builtin.load_mit_movies(folder, slot=option)
    if option:
        raise ValueError(f"Task {base!r} takes no option, got {name!r}.")
    return DATA_TASKS[base](folder)
