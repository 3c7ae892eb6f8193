"""``UtilityResult``: how useful each candidate is as a demonstration, with its uncertainty."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from actsel.io import atomic_path, write_json_atomic


@dataclass
class UtilityResult:
    """Utility per candidate.

    Attributes:
        uids: candidate ids.
        value: utility, shape (n,).
        stderr: standard error of ``value``, shape (n,).
        halves: shape (2, n), the same estimate from two disjoint halves of the
            evaluation queries (one-shot gain) or of the sampled prompts
            (conditional accuracy, influence); the split-half reliability is
            computed from them.
        estimator: estimator name, for example ``"one_shot"``.
        metric: metric name, for example ``"accuracy"``.
        metadata: JSON-serialisable facts about the run.
    """

    uids: list[str]
    value: np.ndarray
    stderr: np.ndarray
    halves: np.ndarray
    estimator: str
    metric: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.value = np.asarray(self.value, dtype=np.float64)
        self.stderr = np.asarray(self.stderr, dtype=np.float64)
        self.halves = np.asarray(self.halves, dtype=np.float64)
        n = len(self.uids)
        if self.value.shape != (n,) or self.stderr.shape != (n,):
            raise ValueError(f"value and stderr must have shape ({n},), got {self.value.shape} and {self.stderr.shape}.")
        if self.halves.shape != (2, n):
            raise ValueError(f"halves must have shape (2, {n}), got {self.halves.shape}.")
        if len(set(self.uids)) != n:
            raise ValueError("uids must be unique.")

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"value": self.value, "stderr": self.stderr, "half_a": self.halves[0], "half_b": self.halves[1]},
            index=pd.Index(self.uids, name="uid"),
        )

    def take(self, uids: Sequence[str]) -> "UtilityResult":
        position = {uid: i for i, uid in enumerate(self.uids)}
        missing = [uid for uid in uids if uid not in position]
        if missing:
            raise KeyError(f"{len(missing)} uids have no utility, for example {missing[0]!r}.")
        rows = [position[uid] for uid in uids]
        return UtilityResult(list(uids), self.value[rows], self.stderr[rows], self.halves[:, rows],
                             self.estimator, self.metric, dict(self.metadata))

    def save(self, path: str | Path) -> None:
        """Write ``path`` (parquet) and ``path`` + ``.json`` (estimator, metric, metadata), each atomically."""
        frame = self.to_frame().reset_index()
        write_json_atomic(str(path) + ".json", {"estimator": self.estimator, "metric": self.metric, "metadata": self.metadata})
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)

    @classmethod
    def load(cls, path: str | Path) -> "UtilityResult":
        path = Path(path)
        side_path = Path(str(path) + ".json")
        if not path.is_file() or not side_path.is_file():
            raise FileNotFoundError(f"Utility file {path} or its side file {side_path.name} is missing.")
        side = json.loads(side_path.read_text())
        frame = pd.read_parquet(path)
        return cls(
            frame["uid"].astype(str).tolist(),
            frame["value"].to_numpy(),
            frame["stderr"].to_numpy(),
            np.stack([frame["half_a"].to_numpy(), frame["half_b"].to_numpy()]),
            side["estimator"],
            side["metric"],
            side["metadata"],
        )
