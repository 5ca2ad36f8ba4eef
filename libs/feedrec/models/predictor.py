"""Inference entry points of the trained models (used by Triton, Serve and evaluation)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from feedrec.artifacts import ModelArtifact, load_artifact
from feedrec.features.transform import ModelInputs
from feedrec.models.batch import to_kjt
from feedrec.models.ranker import Ranker
from feedrec.models.two_tower import TwoTower

M = TypeVar("M", bound=nn.Module)


def trained_model(artifact: ModelArtifact | Path, kind: type[M]) -> M:
    """The served module of ``kind`` from a loaded artifact or its directory (eval mode)."""
    art = artifact if isinstance(artifact, ModelArtifact) else load_artifact(artifact)
    model = art.build_model()
    if not isinstance(model, kind):
        raise TypeError(f"{art.root} holds a {art.kind} model, not a {kind.__name__}")
    return model


class RankerPredictor:
    """Eager ranker inference: ids and dense features in, per-task predictions out."""

    def __init__(self, model: Ranker) -> None:
        self.model = model.eval()

    @classmethod
    def from_artifact(cls, artifact: ModelArtifact | Path) -> RankerPredictor:
        """From a loaded artifact or its directory."""
        return cls(trained_model(artifact, Ranker))

    def __call__(
        self, single_ids: torch.Tensor, multi_ids: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """int64 [N, S], int64 [N, M] (-1 padded), float32 [N, D] -> float32 [N, 5]
        (p(like), p(comment), p(share), p(hide), dwell seconds)."""
        with torch.inference_mode():
            outputs = self.model(dense, to_kjt(single_ids, multi_ids, "ranker"))
            return Ranker.predictions(outputs)

    def predict(self, inputs: ModelInputs, batch_size: int = 8192) -> np.ndarray:
        """Numpy convenience over :meth:`__call__`, in batches: [N, 5]."""
        out = []
        for s in range(0, len(inputs), batch_size):
            out.append(
                self(
                    torch.from_numpy(inputs.single_ids[s : s + batch_size]),
                    torch.from_numpy(inputs.multi_ids[s : s + batch_size]),
                    torch.from_numpy(inputs.dense[s : s + batch_size]),
                ).numpy()
            )
        return np.concatenate(out) if out else np.zeros((0, 5), np.float32)


class TowerEncoder:
    """User and item embeddings from a trained two-tower model."""

    def __init__(self, model: TwoTower) -> None:
        self.model = model.eval()

    @classmethod
    def from_artifact(cls, artifact: ModelArtifact | Path) -> TowerEncoder:
        """From a loaded artifact or its directory."""
        return cls(trained_model(artifact, TwoTower))

    def users(self, inputs: ModelInputs) -> np.ndarray:
        """User-tower inputs [N, ...] -> float32 [N, E] unit vectors."""
        with torch.inference_mode():
            kjt = to_kjt(
                torch.from_numpy(inputs.single_ids),
                torch.from_numpy(inputs.multi_ids),
                "user_tower",
            )
            return self.model.user_embedding(torch.from_numpy(inputs.dense), kjt).numpy()

    def items(self, inputs: ModelInputs, batch_size: int = 8192) -> np.ndarray:
        """Item-tower inputs [N, ...] -> float32 [N, E] unit vectors (batched)."""
        out = []
        with torch.inference_mode():
            for s in range(0, len(inputs), batch_size):
                sl = slice(s, s + batch_size)
                kjt = to_kjt(
                    torch.from_numpy(inputs.single_ids[sl]),
                    torch.from_numpy(inputs.multi_ids[sl]),
                    "item_tower",
                )
                dense = torch.from_numpy(inputs.dense[sl])
                out.append(self.model.item_embedding(dense, kjt).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.embedding_dim))
