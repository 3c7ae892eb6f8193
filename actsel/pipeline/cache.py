"""Stage caches keyed by a hash of the stage's inputs, written in atomic chunks.

A stage's folder is ``<output>/cache/<stage>-<key>``, where ``key`` hashes the
config sections the stage reads, the task's examples and the actsel version. A
chunk file appears only once complete (``actsel.io`` writes through a temporary
file), so a run killed at any moment resumes from the chunks on disk and
recomputes only the missing ones. Chunks are fixed slices of the example list
computed the same way every time, so a resumed run gives identical results.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from actsel.tasks.base import Task

logger = logging.getLogger(__name__)

T = TypeVar("T")


def task_fingerprint(task: Task) -> str:
    """Hash of everything in a task that changes results: examples, templates, verbalizer."""
    digest = hashlib.sha256()
    header = {
        "name": task.name,
        "kind": task.kind,
        "template": task.input_template,
        "verbalizer": task.verbalizer,
        "answer_prefix": task.answer_prefix,
        "separator": task.separator,
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for split in (task.pool, task.eval):
        for example in split:
            digest.update(json.dumps([example.uid, dict(example.fields), example.label], sort_keys=True).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def stage_key(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def chunked(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def run_chunks(
    folder: Path,
    chunks: Sequence[T],
    compute: Callable[[T], object],
    save: Callable[[object, Path], None],
    load: Callable[[Path], object],
    *,
    suffix: str = ".parquet",
    description: str = "",
    progress: bool = True,
) -> list:
    """Compute each chunk not yet on disk, save it, and return all chunks' results in order."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"chunk-{index:05d}{suffix}" for index in range(len(chunks))]
    done = sum(path.exists() for path in paths)
    if done:
        logger.info("%s: %d of %d chunks already on disk in %s", description, done, len(chunks), folder)
    results = []
    bar: Iterable = tqdm(list(zip(chunks, paths)), desc=description, disable=not progress, unit="chunk", initial=0)
    for chunk, path in bar:
        if path.exists():
            results.append(load(path))
            continue
        result = compute(chunk)
        save(result, path)
        results.append(result)
    return results
