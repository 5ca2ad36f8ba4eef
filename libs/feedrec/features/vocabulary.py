"""Vocabularies: raw ids -> embedding rows (row 0 is out-of-vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from feedrec.schema.registry import TABLES

OOV_ROW = 0
PAD = -1


@dataclass(frozen=True)
class Vocabulary:
    """Sorted known raw ids. ``lookup`` maps them to rows 1..len, anything else to row 0.

    Args:
        ids: int64 [V] sorted, unique raw ids seen in the training days.
    """

    ids: np.ndarray

    def __post_init__(self) -> None:
        if self.ids.ndim != 1 or (len(self.ids) > 1 and np.any(np.diff(self.ids) <= 0)):
            raise ValueError("vocabulary ids must be a sorted 1-d array of unique ids")

    @classmethod
    def fit(cls, values: np.ndarray) -> Vocabulary:
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        return cls(np.unique(values[values != PAD]))

    @property
    def num_rows(self) -> int:
        """Embedding table rows: known ids plus the OOV row."""
        return len(self.ids) + 1

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        """Rows for raw ids of any shape; ``PAD`` (-1) stays ``PAD``."""
        raw = np.asarray(raw, dtype=np.int64)
        if len(self.ids) == 0:
            return np.where(raw == PAD, PAD, OOV_ROW)
        pos = np.minimum(np.searchsorted(self.ids, raw), len(self.ids) - 1)
        rows = np.where(self.ids[pos] == raw, pos + 1, OOV_ROW)
        return np.where(raw == PAD, PAD, rows)


@dataclass(frozen=True)
class Vocabularies:
    """One vocabulary per registry vocab name (``TableSpec.vocab``)."""

    by_name: dict[str, Vocabulary]

    def __post_init__(self) -> None:
        missing = {t.vocab for t in TABLES} - set(self.by_name)
        if missing:
            raise ValueError(f"vocabularies missing for {sorted(missing)}")

    def __getitem__(self, name: str) -> Vocabulary:
        return self.by_name[name]

    def num_rows(self) -> dict[str, int]:
        """Rows per table name (what sizes the TorchRec embedding configs)."""
        return {t.name: self.by_name[t.vocab].num_rows for t in TABLES}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: v.ids for k, v in self.by_name.items()})  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: Path) -> Vocabularies:
        with np.load(path, allow_pickle=False) as z:
            return cls({k: Vocabulary(z[k]) for k in z.files})
