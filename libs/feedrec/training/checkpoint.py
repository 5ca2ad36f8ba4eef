"""Fault-tolerant training checkpoints: sharded model + optimizer state, data position, history.

One checkpoint directory (what Ray Train stores; every rank contributes its own files)::

    dcp/           torch.distributed.checkpoint of {"model": DMP state, "optim": optimizer state};
                   each rank writes only its shards (``__<rank>_0.distcp``), rank 0 the metadata
    state.json     rank 0: epoch, batches done in that epoch, global step, history, sharding plan
    weights.pt     rank 0, end of an epoch only: the gathered, unsharded served-module weights
                   (what the model artifact is built from)

Restoring loads every rank's shards back in place, so a restarted worker group continues with the
same embedding rows, Adagrad/Adam state and data position it had at the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.optim.keyed import KeyedOptimizer

DCP_DIR = "dcp"
STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.pt"


@dataclass
class TrainState:
    """Where training stands.

    Args:
        epoch: the epoch in progress (or just finished when ``batches_done`` is 0 and the epoch
            is in ``history``).
        batches_done: batches of ``epoch`` already trained on (the data position within it).
        global_step: optimizer steps since the start of the run, over all attempts.
        history: one metrics dict per finished epoch.
        plan: the sharding plan rows (table -> sharding type -> ranks).
        restores: how many times this run was resumed from a checkpoint.
    """

    epoch: int = 0
    batches_done: int = 0
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    plan: list[dict[str, Any]] = field(default_factory=list)
    restores: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=float)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: KeyedOptimizer,
    state: TrainState,
    *,
    rank: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Collective: every rank calls it with its own (local, empty) ``directory``.

    Ray Train merges the ranks' directories into one checkpoint, which is complete because the
    DCP file names are unique per rank.
    """
    dcp.save(
        {"model": model.state_dict(), "optim": optimizer.state_dict()},
        checkpoint_id=directory / DCP_DIR,
    )
    if rank == 0:
        (directory / STATE_FILE).write_text(state.to_json())
        if weights is not None:
            torch.save(weights, directory / WEIGHTS_FILE)


def restore_checkpoint(directory: Path, model: nn.Module, optimizer: KeyedOptimizer) -> TrainState:
    """Collective: load every rank's shards of model and optimizer state in place.

    The optimizer state is created first (``init_state``): Adam has none before its first step,
    and DCP only fills tensors that already exist.
    """
    optimizer.init_state()
    target = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    dcp.load(target, checkpoint_id=directory / DCP_DIR)
    model.load_state_dict(target["model"])
    optimizer.load_state_dict(target["optim"])
    return TrainState.from_json((directory / STATE_FILE).read_text())


def read_final(directory: Path) -> tuple[dict[str, torch.Tensor], TrainState]:
    """Driver side: the unsharded weights and state of an end-of-epoch checkpoint."""
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.exists():
        raise FileNotFoundError(f"{directory} is a mid-epoch checkpoint (no {WEIGHTS_FILE})")
    weights = torch.load(weights_path, weights_only=True)
    return weights, TrainState.from_json((directory / STATE_FILE).read_text())
