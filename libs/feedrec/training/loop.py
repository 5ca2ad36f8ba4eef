"""The per-worker training loop run by Ray Train's ``TorchTrainer``."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from feedrec.evaluation.metrics import auc, logloss
from feedrec.models.batch import BINARY_TASKS, PairBatch, RankerBatch
from feedrec.models.ranker import Ranker, RankerConfig, RankerTrain
from feedrec.models.two_tower import TwoTower, TwoTowerConfig, TwoTowerTrain
from feedrec.training.config import TrainConfig
from feedrec.training.sharding import describe_plan, gather_state_dict, shard

CHECKPOINT_WEIGHTS = "weights.pt"
CHECKPOINT_STATE = "state.json"


def build_train_module(
    cfg: TrainConfig, model_config: RankerConfig | TwoTowerConfig
) -> tuple[nn.Module, nn.Module]:
    """(train wrapper, served module) with tables on the meta device, ready for sharding."""
    meta = torch.device("meta")
    if isinstance(model_config, RankerConfig):
        ranker = Ranker(model_config, embedding_device=meta)
        return RankerTrain(ranker), ranker
    two_tower = TwoTower(model_config, embedding_device=meta)
    return TwoTowerTrain(two_tower), two_tower


def _gather(values: list[np.ndarray]) -> np.ndarray:
    """Concatenate arrays from every rank (valid sets are small)."""
    local = np.concatenate(values) if values else np.zeros((0,))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return np.concatenate([v for v in everyone if len(v)])


def _validate(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    model.eval()
    shard_it = ray.train.get_dataset_shard("valid")
    losses, outputs, labels = [], [], []
    with torch.no_grad():
        for cols in shard_it.iter_batches(batch_size=cfg.batch_size, batch_format="numpy"):
            if cfg.model == "ranker":
                batch: RankerBatch | PairBatch = RankerBatch.from_columns(cols).to(device)
            else:
                batch = PairBatch.from_columns(cols).to(device)
            loss, out = model(batch)
            losses.append(np.array([loss.item()]))
            if isinstance(batch, RankerBatch):
                outputs.append(out.cpu().numpy())
                labels.append(batch.labels.cpu().numpy())
            else:  # in-batch top-1 accuracy: is the positive the best of the batch?
                hit = (out.argmax(dim=1) == torch.arange(len(out), device=out.device)).float()
                outputs.append(hit.cpu().numpy())
    metrics = {"valid_loss": float(_gather(losses).mean())}
    if cfg.model == "ranker":
        out_all, lab_all = _gather(outputs), _gather(labels)
        for i, task in enumerate(BINARY_TASKS):
            prob = 1 / (1 + np.exp(-out_all[:, i]))
            metrics[f"valid_auc_{task}"] = auc(lab_all[:, i], prob)
            metrics[f"valid_logloss_{task}"] = logloss(lab_all[:, i], prob)
    else:
        metrics["valid_inbatch_top1"] = float(_gather(outputs).mean())
    model.train()
    return metrics


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: shard, train, validate and checkpoint once per epoch.

    ``loop_config``: {"train": TrainConfig dict, "model_kind": str, "model_config": dict}.
    """
    cfg = TrainConfig(**loop_config["train"])
    model_config: RankerConfig | TwoTowerConfig = loop_config["model_config"]
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    rank = ray.train.get_context().get_world_rank()

    train_module, served = build_train_module(cfg, model_config)
    dmp, plan = shard(
        train_module, device, sparse_lr=cfg.sparse_lr, overrides=cfg.sharding_overrides
    )
    plan_rows = describe_plan(plan)
    if rank == 0:
        for row in plan_rows:
            print(f"[sharding] {row['table']}: {row['sharding']} on ranks {row['ranks']}")
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.dense_lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    collate = RankerBatch.from_columns if cfg.model == "ranker" else PairBatch.from_columns

    history: list[dict[str, float]] = []
    train_shard = ray.train.get_dataset_shard("train")
    for epoch in range(cfg.epochs):
        started, seen, loss_sum, steps = time.perf_counter(), 0, 0.0, 0
        for cols in train_shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            drop_last=True,  # every rank must run the same number of collective steps
            local_shuffle_buffer_size=cfg.batch_size * 4,
            local_shuffle_seed=cfg.seed + epoch,
        ):
            batch = collate(cols).to(device)
            loss, _ = dmp(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            steps += 1
            seen += cfg.batch_size
        elapsed = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(steps, 1),
            "samples_per_s_per_worker": seen / max(elapsed, 1e-9),
            **_validate(dmp, cfg, device),
        }
        history.append(metrics)
        # DMP swaps sharded tables into the module tree in place, so `served` is the sharded model.
        state = gather_state_dict(served)
        if rank == 0 and state is not None:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(state, Path(tmp) / CHECKPOINT_WEIGHTS)
                info = {"epoch": epoch, "history": history, "plan": plan_rows}
                (Path(tmp) / CHECKPOINT_STATE).write_text(json.dumps(info, default=float))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
