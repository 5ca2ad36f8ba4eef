"""Multi-task ranker over TorchRec embeddings, and ``RankerTrain`` which owns its loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feedrec.models.batch import BINARY_TASKS, RankerBatch
from feedrec.models.embeddings import embedding_bag_collection, pooled, pooled_dim
from feedrec.schema.registry import TASKS, dense_dim

#: Weight of the dwell regression (on log1p seconds) next to the summed binary cross-entropies.
DWELL_LOSS_WEIGHT = 0.1


@dataclass(frozen=True)
class RankerConfig:
    """Architecture. ``num_rows``: embedding rows per registry table (from the vocabularies)."""

    num_rows: dict[str, int]
    dense_arch: tuple[int, ...] = (64, 32)
    over_arch: tuple[int, ...] = (256, 128)

    def __post_init__(self) -> None:
        if not self.dense_arch or not self.over_arch or min(self.dense_arch + self.over_arch) < 1:
            raise ValueError("ranker config: layer sizes must be non-empty and positive")


class Ranker(nn.Module):
    """Scores (user, post) rows for every task.

    Dense features go through a small MLP, sparse ones through an ``EmbeddingBagCollection``; the
    concatenation feeds the over-arch and one linear head per task.

    Example::

        model = Ranker(RankerConfig(num_rows=vocabs.num_rows()))
        out = model(dense, kjt)  # [B, 5]: 4 logits (like, comment, share, hide), log1p(dwell)
    """

    def __init__(self, config: RankerConfig, embedding_device: torch.device | None = None) -> None:
        """``embedding_device="meta"`` defers the tables to ``DistributedModelParallel``."""
        super().__init__()
        self.config = config
        self.ebc = embedding_bag_collection("ranker", config.num_rows, device=embedding_device)
        self.dense_arch = MLP(dense_dim("ranker"), list(config.dense_arch))
        over_in = config.dense_arch[-1] + pooled_dim("ranker")
        self.over_arch = MLP(over_in, list(config.over_arch))
        self.head = nn.Linear(config.over_arch[-1], len(TASKS))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense float32 [B, dense_dim("ranker")]; sparse: KJT of the ranker features.

        Returns: float32 [B, 5]: logits of like, comment, share, hide, then predicted log1p(dwell).
        """
        x = torch.cat([self.dense_arch(dense), pooled(self.ebc, sparse, "ranker")], dim=1)
        return self.head(self.over_arch(x))

    @staticmethod
    def predictions(outputs: torch.Tensor) -> torch.Tensor:
        """[B, 5] outputs -> [B, 5]: probabilities of the binary tasks, dwell in seconds."""
        n = len(BINARY_TASKS)
        dwell = torch.expm1(outputs[:, n:].clamp(min=0.0))
        return torch.cat([torch.sigmoid(outputs[:, :n]), dwell], dim=1)


class RankerTrain(nn.Module):
    """Training wrapper: ``forward(batch) -> (loss, detached outputs)``."""

    def __init__(self, model: Ranker) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: RankerBatch) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.model(batch.inputs.dense, batch.inputs.sparse)
        n = len(BINARY_TASKS)
        bce = nn.functional.binary_cross_entropy_with_logits(outputs[:, :n], batch.labels)
        dwell = nn.functional.mse_loss(outputs[:, n], torch.log1p(batch.dwell))
        loss = bce * n + DWELL_LOSS_WEIGHT * dwell
        return loss, outputs.detach()
