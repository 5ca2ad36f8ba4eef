"""Multi-task ranker over TorchRec embeddings, and ``RankerTrain`` which owns its loss."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feedrec.models.batch import BINARY_TASKS, RankerBatch
from feedrec.models.embeddings import embedding_bag_collection, pooled, pooled_dim
from feedrec.models.model_config import RankerConfig
from feedrec.schema.registry import TASKS, dense_dim

#: Weight of the dwell regression (on log1p seconds) next to the summed binary cross-entropies.
DWELL_LOSS_WEIGHT = 0.1


def _tower(in_size: int, hidden: tuple[int, ...]) -> nn.Module:
    """Hidden ReLU layers then one output unit: [B, in_size] -> [B, 1]."""
    if not hidden:
        return nn.Linear(in_size, 1)
    return nn.Sequential(MLP(in_size, list(hidden)), nn.Linear(hidden[-1], 1))


class Ranker(nn.Module):
    """Scores (user, post) rows for every task.

    x0 = [dense MLP(dense), pooled embeddings]; DCN-v2 cross layers model explicit feature
    crosses; a shared bottom (or MMoE experts with per-task gates) feeds one tower per task.
    Per-head Platt calibration (``calibration``, fitted after training on the validation split)
    maps each binary logit ``l`` to ``scale * l + bias``; it is the identity until fitted.

    Example::

        model = Ranker(RankerConfig(num_rows=vocabs.num_rows()))
        out = model(dense, kjt)  # [B, 5]: 4 logits (like, comment, share, hide), log1p(dwell)
    """

    calibration: torch.Tensor

    def __init__(self, config: RankerConfig, embedding_device: torch.device | None = None) -> None:
        """``embedding_device="meta"`` defers the tables to ``DistributedModelParallel``."""
        super().__init__()
        self.config = config
        self.ebc = embedding_bag_collection("ranker", config.num_rows, device=embedding_device)
        self.dense_arch = MLP(dense_dim("ranker"), list(config.dense_arch))
        x0 = config.dense_arch[-1] + pooled_dim("ranker")
        self.cross: nn.Module = (
            LowRankCrossNet(x0, config.cross_layers, config.cross_rank)
            if config.interaction == "dcn"
            else nn.Identity()
        )
        n_bottoms = max(config.num_experts, 1)
        self.bottoms = nn.ModuleList(MLP(x0, list(config.over_arch)) for _ in range(n_bottoms))
        self.gates = nn.ModuleList(
            nn.Linear(x0, config.num_experts) for _ in TASKS if config.num_experts
        )
        self.towers = nn.ModuleList(_tower(config.over_arch[-1], config.task_arch) for _ in TASKS)
        # [4, 2]: (scale, bias) per binary head; a buffer so it travels with the weights.
        identity = torch.tensor([[1.0, 0.0]] * len(BINARY_TASKS))
        self.register_buffer("calibration", identity)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        """Args: dense float32 [B, dense_dim("ranker")]; sparse: KJT of the ranker features.

        Returns: float32 [B, 5]: logits of like, comment, share, hide, then predicted log1p(dwell).
        """
        return self.head(dense, pooled(self.ebc, sparse, "ranker"))

    def head(self, dense: torch.Tensor, pooled_embeddings: torch.Tensor) -> torch.Tensor:
        """Everything after the embedding lookup (plain torch ops, so it traces and exports).

        Args: dense float32 [B, dense_dim("ranker")]; pooled_embeddings float32
        [B, pooled_dim("ranker")] in registry feature order. Returns: [B, 5] as ``forward``.
        """
        x0 = torch.cat([self.dense_arch(dense), pooled_embeddings], dim=1)
        x = self.cross(x0)
        if self.config.num_experts:
            experts = torch.stack([b(x) for b in self.bottoms], dim=1)  # [B, E, H]
            outs = []
            for gate, tower in zip(self.gates, self.towers, strict=True):
                weights = torch.softmax(gate(x), dim=1).unsqueeze(2)  # [B, E, 1]
                outs.append(tower((weights * experts).sum(dim=1)))
        else:
            shared = self.bottoms[0](x)
            outs = [tower(shared) for tower in self.towers]
        out = torch.cat(outs, dim=1)
        n = len(BINARY_TASKS)
        logits = out[:, :n] * self.calibration[:, 0] + self.calibration[:, 1]
        return torch.cat([logits, out[:, n:]], dim=1)

    @staticmethod
    def predictions(outputs: torch.Tensor) -> torch.Tensor:
        """[B, 5] outputs -> [B, 5]: probabilities of the binary tasks, dwell in seconds."""
        n = len(BINARY_TASKS)
        # exp(x) - 1, not expm1: ONNX has no expm1; for x >= 0 the two differ by < 1e-7 absolute.
        dwell = torch.exp(outputs[:, n:].clamp(min=0.0)) - 1.0
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
