"""Raw point-in-time columns -> model inputs. Used by training (Ray Data) and serving alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feedrec.features.vocabulary import Vocabularies
from feedrec.schema.registry import (
    AGE_DECAY_DAYS,
    RATE_PRIOR,
    TABLES,
    DenseFeature,
    ModelPart,
    dense_features,
    sparse_features,
)


@dataclass(frozen=True)
class ModelInputs:
    """Inputs of one model part for N rows (numpy; the torch side builds the KJT).

    Attributes:
        dense: float32 [N, dense_dim(part)] in registry order.
        single_ids: int64 [N, S] embedding rows of the single-valued sparse features.
        multi_ids: int64 [N, M] rows of the multi-valued features, concatenated, -1 padded.
    """

    dense: np.ndarray
    single_ids: np.ndarray
    multi_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.dense)

    def to_columns(self, prefix: str = "") -> dict[str, np.ndarray]:
        """As a Ray Data batch (``dict[str, np.ndarray]``)."""
        return {
            f"{prefix}dense": self.dense,
            f"{prefix}single_ids": self.single_ids,
            f"{prefix}multi_ids": self.multi_ids,
        }

    @classmethod
    def from_columns(cls, batch: dict[str, np.ndarray], prefix: str = "") -> ModelInputs:
        return cls(
            dense=np.asarray(batch[f"{prefix}dense"], dtype=np.float32),
            single_ids=np.asarray(batch[f"{prefix}single_ids"], dtype=np.int64),
            multi_ids=np.asarray(batch[f"{prefix}multi_ids"], dtype=np.int64),
        )


def _dense_column(spec: DenseFeature, raw: dict[str, np.ndarray]) -> np.ndarray:
    x = np.asarray(raw[spec.inputs[0]], dtype=np.float32)
    if spec.kind == "log1p":
        return np.log1p(np.maximum(x, 0.0))
    if spec.kind == "rate":
        return x / (np.asarray(raw[spec.inputs[1]], dtype=np.float32) + RATE_PRIOR)
    if spec.kind == "mean":
        return np.log1p(x / (np.asarray(raw[spec.inputs[1]], dtype=np.float32) + 1.0))
    if spec.kind == "vector_mean":  # x [N, dim] sums over count [N] events, + 1 pseudo-event
        count = np.asarray(raw[spec.inputs[1]], dtype=np.float32).reshape(len(x), 1)
        return x / (count + 1.0)
    if spec.kind == "age_log":
        return np.log1p(np.maximum(x, 0.0))
    if spec.kind == "age_decay":
        return np.exp(-np.maximum(x, 0.0) / AGE_DECAY_DAYS)
    if spec.kind == "identity":
        return x
    raise ValueError(f"unknown dense transform {spec.kind!r}")


@dataclass(frozen=True)
class FeatureTransform:
    """Turns raw columns into :class:`ModelInputs` for a model part, using fitted vocabularies."""

    vocabs: Vocabularies

    def __call__(self, raw: dict[str, np.ndarray], part: ModelPart) -> ModelInputs:
        """Args: raw: columns named as ``RAW_COLUMNS`` (only those ``part`` needs), length N."""
        cols = []
        for spec in dense_features(part):
            col = _dense_column(spec, raw)
            cols.append(col.reshape(len(col), spec.dim))
        n = len(cols[0]) if cols else len(next(iter(raw.values())))
        dense = np.concatenate(cols, axis=1) if cols else np.zeros((n, 0), np.float32)
        vocab_of = {t.name: t.vocab for t in TABLES}
        single: list[np.ndarray] = []
        multi: list[np.ndarray] = []
        for f in sparse_features(part):
            rows = self.vocabs[vocab_of[f.table]].lookup(raw[f.name])
            (single if f.max_len == 1 else multi).append(rows.reshape(n, f.max_len))
        return ModelInputs(
            dense=np.ascontiguousarray(dense, dtype=np.float32),
            single_ids=np.concatenate(single, axis=1) if single else np.zeros((n, 0), np.int64),
            multi_ids=np.concatenate(multi, axis=1) if multi else np.zeros((n, 0), np.int64),
        )
