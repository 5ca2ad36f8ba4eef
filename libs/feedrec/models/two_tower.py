"""Two-tower retrieval model and ``TwoTowerTrain`` (in-batch negatives) which owns its loss."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feedrec.models.batch import PairBatch
from feedrec.models.embeddings import embedding_bag_collection, pooled, pooled_dim
from feedrec.models.model_config import TwoTowerConfig
from feedrec.schema.registry import ModelPart, dense_dim


class _Tower(nn.Module):
    """Embeddings of one part + its dense features -> MLP -> unit-norm embedding."""

    def __init__(
        self, part: ModelPart, config: TwoTowerConfig, embedding_device: torch.device | None
    ) -> None:
        super().__init__()
        self.part: ModelPart = part
        self.ebc = embedding_bag_collection(part, config.num_rows, device=embedding_device)
        in_size = pooled_dim(part) + dense_dim(part)
        self.mlp = MLP(in_size, list(config.tower_arch))
        self.out = nn.Linear(config.tower_arch[-1], config.embedding_dim)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        x = torch.cat([pooled(self.ebc, sparse, self.part), dense], dim=1)
        return nn.functional.normalize(self.out(self.mlp(x)), dim=1)


class TwoTower(nn.Module):
    """User and item towers mapping to the same unit sphere; score = inner product.

    Example::

        model = TwoTower(TwoTowerConfig(num_rows=vocabs.num_rows()))
        u = model.user_embedding(user_dense, user_kjt)  # [B, E], unit norm
        v = model.item_embedding(item_dense, item_kjt)  # [N, E], unit norm
    """

    def __init__(
        self, config: TwoTowerConfig, embedding_device: torch.device | None = None
    ) -> None:
        """``embedding_device="meta"`` defers the tables to ``DistributedModelParallel``."""
        super().__init__()
        self.config = config
        self.user_tower = _Tower("user_tower", config, embedding_device)
        self.item_tower = _Tower("item_tower", config, embedding_device)

    def user_embedding(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """dense [B, dense_dim("user_tower")], user KJT -> [B, embedding_dim]."""
        return self.user_tower(dense, sparse)

    def item_embedding(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """dense [N, dense_dim("item_tower")], item KJT -> [N, embedding_dim]."""
        return self.item_tower(dense, sparse)

    def forward(
        self,
        user_dense: torch.Tensor,
        user_sparse: KeyedJaggedTensor,
        item_dense: torch.Tensor,
        item_sparse: KeyedJaggedTensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_tower(user_dense, user_sparse), self.item_tower(item_dense, item_sparse)


class TwoTowerTrain(nn.Module):
    """Sampled-softmax loss with in-batch negatives: row i's positive is item i.

    With random negatives in the batch (mixed negative sampling) every row scores the B in-batch
    items and the B random posts: logits [B, 2B]. Popular items show up as negatives more often
    than the corpus distribution says; subtracting log q(item) from the logits (logQ
    correction, Yi et al. 2019) removes that sampling bias. Returns the corrected loss and the
    *uncorrected* logits (what serving ranks by).
    """

    def __init__(self, model: TwoTower, *, logq_correction: bool = True) -> None:
        super().__init__()
        self.model = model
        self.logq_correction = logq_correction

    def forward(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        u, v = self.model(batch.user.dense, batch.user.sparse, batch.item.dense, batch.item.sparse)
        log_q = batch.item_log_q
        if batch.negative is not None and batch.negative_log_q is not None:
            neg = self.model.item_embedding(batch.negative.dense, batch.negative.sparse)
            v, log_q = torch.cat([v, neg]), torch.cat([log_q, batch.negative_log_q])
        logits = u @ v.T / self.model.config.temperature
        target = torch.arange(len(u), device=u.device)
        corrected = logits - log_q[None, :] if self.logq_correction else logits
        return nn.functional.cross_entropy(corrected, target), logits.detach()
