"""Warm start: begin training from an earlier model (e.g. production) instead of from scratch.

Continual training on a few new log days should not forget what earlier days taught. The
earlier model is a verified artifact (:func:`feedrec.artifacts.load_artifact`). Its architecture
must match the new one in everything but table sizes: the vocabularies change as new users
and posts arrive. So every embedding table is remapped row by row:

* a raw id known to both vocabularies gets its earlier row;
* the out-of-vocabulary row (0) gets the earlier OOV row;
* a new id keeps the fresh initialisation of the new model;
* an id that left the vocabulary is dropped.

Dense parameters are copied as they are. Calibration is not copied: it is fitted again on the
new validation split. Optimizer state (Adagrad, Adam) starts fresh.

Workers apply the start after sharding (:meth:`WarmStart.apply`). Each rank copies into its own
shards by their offsets, so any sharding works: table-, row- or column-wise, or data-parallel.
Every rank holds the earlier state dict in memory once, which bounds this to tables that fit in
a worker's RAM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import torch
from torch import nn

from feedrec.artifacts import load_artifact
from feedrec.features.vocabulary import Vocabularies
from feedrec.models.ranker import RankerConfig
from feedrec.models.two_tower import TwoTowerConfig
from feedrec.schema.registry import TABLES, ModelPart

#: Buffers fitted after training, never carried over.
NOT_CARRIED = ("calibration",)
NEW_ROW = -1
TABLE_VOCABULARY = {t.name: t.vocab for t in TABLES}


def table_of(key: str) -> str | None:
    """The registry table of an embedding weight's state-dict key (``...embedding_bags.
    <part>_<table>.weight``), or None for a dense parameter."""
    if "embedding_bags." not in key or not key.endswith(".weight"):
        return None
    name = key.rsplit("embedding_bags.", 1)[1][: -len(".weight")]
    for part in get_args(ModelPart):
        if name.startswith(f"{part}_"):
            return name[len(part) + 1 :]
    return None


def _architecture(config: RankerConfig | TwoTowerConfig) -> dict[str, object]:
    return {k: v for k, v in asdict(config).items() if k != "num_rows"}


@dataclass(frozen=True)
class WarmStart:
    """The earlier weights and where each of their rows goes.

    source: the artifact's version label; tensors: served-module key -> earlier tensor;
    rows: embedding key -> int64 [R_new], the earlier row of each new row (``NEW_ROW``: keep
    the fresh initialisation); carried: table -> new rows that got an earlier row.
    """

    source: str
    tensors: dict[str, torch.Tensor]
    rows: dict[str, np.ndarray]
    carried: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_artifact(
        cls, artifact_dir: Path, model_config: RankerConfig | TwoTowerConfig, vocabs: Vocabularies
    ) -> WarmStart:
        """Plan the start of a model of ``model_config`` with ``vocabs`` from the artifact at
        ``artifact_dir``. Raises ``ValueError`` naming what differs if it cannot be carried."""
        artifact = load_artifact(Path(artifact_dir))
        if type(artifact.model_config) is not type(model_config):
            raise ValueError(
                f"warm start: {artifact_dir} holds a {artifact.kind} model, not a "
                f"{type(model_config).__name__.removesuffix('Config').lower()}"
            )
        before, now = _architecture(artifact.model_config), _architecture(model_config)
        changed = sorted(k for k in now if before.get(k) != now[k])
        if changed:
            raise ValueError(
                f"warm start: the architecture differs from {artifact.version} in {changed} "
                "(warm start carries weights between models of the same architecture)"
            )
        tensors: dict[str, torch.Tensor] = {}
        rows: dict[str, np.ndarray] = {}
        carried: dict[str, int] = {}
        for key, tensor in artifact.state_dict.items():
            if key.rsplit(".", 1)[-1] in NOT_CARRIED:
                continue
            tensors[key] = tensor
            table = table_of(key)
            if table is None:
                continue
            vocab = TABLE_VOCABULARY[table]
            old, new = artifact.vocabs[vocab], vocabs[vocab]
            mapped = old.lookup(new.ids)  # 0 where the id is new
            index = np.concatenate([[0], np.where(mapped > 0, mapped, NEW_ROW)]).astype(np.int64)
            rows[key] = index
            carried[table] = int((index >= 0).sum())
        return cls(artifact.version, tensors, rows, carried)

    def apply(self, module: nn.Module) -> int:
        """Copy into ``module`` (the served module after sharding: its tables may be
        ShardedTensors, each rank holding some shards). Returns the values copied on this rank.
        Raises ``ValueError`` when a dense parameter's shape or a key differs."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        state = module.state_dict()
        missing = sorted(set(self.tensors) - set(state))
        if missing:
            raise ValueError(f"warm start: the new model has no {missing}")
        copied = 0
        with torch.no_grad():
            for key, target in state.items():
                if key not in self.tensors:
                    continue  # a fitted buffer (calibration): stays as initialised
                source = self.tensors[key]
                index = self.rows.get(key)
                if isinstance(target, ShardedTensor):
                    for shard in target.local_shards():
                        r0, c0 = shard.metadata.shard_offsets
                        nr, nc = shard.metadata.shard_sizes
                        copied += _copy_rows(shard.tensor, source, index, r0, c0, nr, nc)
                elif index is not None:
                    copied += _copy_rows(target, source, index, 0, 0, *target.shape)
                else:
                    if target.shape != source.shape:
                        raise ValueError(
                            f"warm start: {key} is {tuple(target.shape)}, was {tuple(source.shape)}"
                        )
                    target.copy_(source.to(target.device, target.dtype))
                    copied += target.numel()
        # The copies went into the state dict's tensors; loading them back is what makes them
        # the module's for tensors that are not views of its storage (as restoring does).
        module.load_state_dict(state)
        return copied


def _copy_rows(
    dst: torch.Tensor,
    source: torch.Tensor,
    index: np.ndarray | None,
    r0: int,
    c0: int,
    nr: int,
    nc: int,
) -> int:
    """Rows ``r0 .. r0+nr`` and columns ``c0 .. c0+nc`` of a table, held in ``dst`` [nr, nc],
    from ``source`` through ``index`` (new row -> earlier row, ``NEW_ROW`` to keep)."""
    rows = np.arange(r0, r0 + nr) if index is None else index[r0 : r0 + nr]
    keep = rows >= 0
    if not keep.any():
        return 0
    local = torch.from_numpy(np.flatnonzero(keep)).to(dst.device)
    earlier = source[torch.from_numpy(rows[keep]), c0 : c0 + nc]
    dst.index_copy_(0, local, earlier.to(dst.device, dst.dtype))
    return int(keep.sum()) * nc
