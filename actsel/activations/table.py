"""``FeatureTable``: per-example statistics, one column per (mask, hook, layer, span, statistic).

Extraction, SAE features, correlation and selection all exchange this table. It
is saved as parquet with the feature keys and metadata in a JSON side file, so
loading never unpickles anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from actsel.io import atomic_path, write_json_atomic

FEATURE_KEYS = ("mask", "hook", "layer", "span", "statistic")


@dataclass
class FeatureTable:
    """Statistics of ``n_examples`` examples over ``n_features`` feature keys.

    Attributes:
        values: float64 array of shape (n_examples, n_features). NaN marks a
            statistic that was not finite (for example after fp16 overflow).
        columns: one row per feature with the columns ``FEATURE_KEYS``.
        uids: example ids in row order.
        labels: example labels (class name or answer) in row order.
        metadata: JSON-serialisable facts about the run (model, task, context).
    """

    values: np.ndarray
    columns: pd.DataFrame
    uids: list[str]
    labels: list[str]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.ndim != 2:
            raise ValueError(f"values must be 2-D (n_examples, n_features), got shape {self.values.shape}.")
        missing = [key for key in FEATURE_KEYS if key not in self.columns.columns]
        if missing:
            raise ValueError(f"columns is missing the feature keys {missing}; expected {list(FEATURE_KEYS)}.")
        self.columns = self.columns[list(FEATURE_KEYS)].reset_index(drop=True)
        self.columns["layer"] = self.columns["layer"].astype(int)
        if self.values.shape != (len(self.uids), len(self.columns)):
            raise ValueError(
                f"values has shape {self.values.shape} but there are {len(self.uids)} uids and "
                f"{len(self.columns)} feature columns."
            )
        if len(self.labels) != len(self.uids):
            raise ValueError(f"{len(self.labels)} labels for {len(self.uids)} uids.")
        if len(set(self.uids)) != len(self.uids):
            raise ValueError("uids must be unique.")
        if self.columns.duplicated().any():
            duplicate = self.columns[self.columns.duplicated()].iloc[0].to_dict()
            raise ValueError(f"Duplicate feature column {duplicate}.")

    @property
    def n_examples(self) -> int:
        return self.values.shape[0]

    @property
    def n_features(self) -> int:
        return self.values.shape[1]

    def to_frame(self) -> pd.DataFrame:
        """Wide DataFrame: index ``uid``, MultiIndex columns ``FEATURE_KEYS``."""
        index = pd.MultiIndex.from_frame(self.columns)
        return pd.DataFrame(self.values, index=pd.Index(self.uids, name="uid"), columns=index)

    def to_long(self) -> pd.DataFrame:
        """Long DataFrame: one row per (example, feature) with a ``value`` column."""
        frame = self.to_frame().stack(list(FEATURE_KEYS), future_stack=True).rename("value").reset_index()
        return frame

    def _mask_for(self, filters: dict) -> np.ndarray:
        keep = np.ones(len(self.columns), dtype=bool)
        for key, wanted in filters.items():
            if key not in FEATURE_KEYS:
                raise ValueError(f"Unknown feature key {key!r}; valid keys: {list(FEATURE_KEYS)}.")
            wanted_values = list(wanted) if isinstance(wanted, (list, tuple, set)) else [wanted]
            present = set(self.columns[key])
            unknown = [value for value in wanted_values if value not in present]
            if unknown:
                raise ValueError(
                    f"No feature has {key}={unknown[0]!r}; valid values: {sorted(present, key=str)}."
                )
            keep &= self.columns[key].isin(wanted_values).to_numpy()
        return keep

    def feature_index(self, **key) -> int:
        """Index of the single feature matching ``key``; raises unless exactly one matches."""
        matches = np.flatnonzero(self._mask_for(key))
        if len(matches) != 1:
            remaining = [name for name in FEATURE_KEYS if name not in key]
            raise ValueError(
                f"{len(matches)} features match {key}; also give {remaining} to pick one feature."
            )
        return int(matches[0])

    def column(self, **key) -> np.ndarray:
        """Values of one feature, shape (n_examples,)."""
        return self.values[:, self.feature_index(**key)]

    def feature_name(self, index: int) -> str:
        row = self.columns.iloc[index]
        return "/".join(str(row[key]) for key in FEATURE_KEYS)

    def select(self, **filters) -> "FeatureTable":
        """Keep the features matching every filter (a filter value may be a list)."""
        keep = self._mask_for(filters)
        return FeatureTable(self.values[:, keep], self.columns[keep], list(self.uids), list(self.labels), dict(self.metadata))

    def take(self, uids: Sequence[str]) -> "FeatureTable":
        """Keep the rows of ``uids``, in that order."""
        position = {uid: row for row, uid in enumerate(self.uids)}
        missing = [uid for uid in uids if uid not in position]
        if missing:
            raise KeyError(f"{len(missing)} uids are not in the feature table, for example {missing[0]!r}.")
        rows = [position[uid] for uid in uids]
        return FeatureTable(self.values[rows], self.columns.copy(), list(uids), [self.labels[r] for r in rows], dict(self.metadata))

    @staticmethod
    def concat_features(tables: Iterable["FeatureTable"]) -> "FeatureTable":
        """Put the features of tables over the same examples side by side."""
        tables = list(tables)
        if not tables:
            raise ValueError("concat_features needs at least one table.")
        first = tables[0]
        aligned = [first] + [table.take(first.uids) for table in tables[1:]]
        metadata = {}
        for table in aligned:
            metadata.update(table.metadata)
        return FeatureTable(
            np.concatenate([table.values for table in aligned], axis=1),
            pd.concat([table.columns for table in aligned], ignore_index=True),
            list(first.uids),
            list(first.labels),
            metadata,
        )

    @staticmethod
    def concat_rows(tables: Iterable["FeatureTable"]) -> "FeatureTable":
        """Stack tables with the same features over different examples (chunks of one run)."""
        tables = list(tables)
        if not tables:
            raise ValueError("concat_rows needs at least one table.")
        first = tables[0]
        for table in tables[1:]:
            if not table.columns.equals(first.columns):
                raise ValueError("concat_rows needs tables with identical feature columns in the same order.")
        metadata = dict(first.metadata)
        for table in tables[1:]:
            for key, value in table.metadata.items():
                if isinstance(value, list) and isinstance(metadata.get(key), list):
                    metadata[key] = metadata[key] + value
                else:
                    metadata.setdefault(key, value)
        return FeatureTable(
            np.concatenate([table.values for table in tables], axis=0),
            first.columns.copy(),
            [uid for table in tables for uid in table.uids],
            [label for table in tables for label in table.labels],
            metadata,
        )

    def save(self, path: str | Path) -> None:
        """Write ``path`` (parquet) and ``path`` + ``.json`` (feature keys and metadata), each atomically."""
        path = Path(path)
        frame = pd.DataFrame(self.values, columns=[f"f{i}" for i in range(self.n_features)])
        frame.insert(0, "uid", self.uids)
        frame.insert(1, "label", self.labels)
        side = {"columns": self.columns.to_dict(orient="list"), "metadata": self.metadata}
        write_json_atomic(str(path) + ".json", side)
        with atomic_path(path) as tmp:
            frame.to_parquet(tmp, index=False)

    @classmethod
    def load(cls, path: str | Path) -> "FeatureTable":
        path = Path(path)
        side_path = Path(str(path) + ".json")
        if not path.is_file() or not side_path.is_file():
            raise FileNotFoundError(f"Feature table {path} or its side file {side_path.name} is missing.")
        side = json.loads(side_path.read_text())
        frame = pd.read_parquet(path)
        columns = pd.DataFrame(side["columns"])
        values = frame[[f"f{i}" for i in range(len(columns))]].to_numpy(dtype=np.float64)
        return cls(values, columns, frame["uid"].astype(str).tolist(), frame["label"].astype(str).tolist(), side["metadata"])
