"""TorchRec embedding configs derived from the feature registry."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from feedrec.schema.registry import ModelPart, sparse_features, tables_for

_POOLING = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}


def embedding_bag_configs(part: ModelPart, num_rows: dict[str, int]) -> list[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per registry table used by ``part``.

    Args:
        num_rows: rows per table name (``Vocabularies.num_rows()``).
    """
    configs = []
    for table, features in tables_for(part).items():
        # Pooling is per table in TorchRec; it only matters for multi-valued features.
        poolings = {f.pooling for f in features if f.max_len > 1} or {"sum"}
        if len(poolings) != 1:
            raise ValueError(f"table {table.name}: features disagree on pooling {poolings}")
        configs.append(
            EmbeddingBagConfig(
                name=f"{part}_{table.name}",
                embedding_dim=table.dim,
                num_embeddings=num_rows[table.name],
                feature_names=[f.name for f in features],
                pooling=_POOLING[poolings.pop()],
            )
        )
    return configs


def embedding_bag_collection(
    part: ModelPart, num_rows: dict[str, int], device: torch.device | None = None
) -> EmbeddingBagCollection:
    """The part's ``EmbeddingBagCollection`` (``device="meta"`` defers allocation to sharding)."""
    return EmbeddingBagCollection(tables=embedding_bag_configs(part, num_rows), device=device)


def pooled(ebc: nn.Module, sparse: KeyedJaggedTensor, part: ModelPart) -> torch.Tensor:
    """Pooled embeddings [B, pooled_dim(part)], one slot per feature in registry order.

    The order is fixed here on purpose: a sharded collection returns its ``KeyedTensor`` grouped by
    sharding type, so ``.values()`` of the sharded and unsharded module differ in column order.
    """
    kt = ebc(sparse)
    return torch.cat([kt[f.name] for f in sparse_features(part)], dim=1)


def pooled_dim(part: ModelPart) -> int:
    """Width of the concatenated pooled embeddings of ``part`` (one slot per feature)."""
    return sum(t.dim * len(fs) for t, fs in tables_for(part).items())
