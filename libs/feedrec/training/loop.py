"""The per-worker training loop run by Ray Train's ``TorchTrainer``."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Iterable
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

from feedrec.data.examples import Columns
from feedrec.evaluation.metrics import auc, logloss
from feedrec.models.batch import BINARY_TASKS, PairBatch, RankerBatch
from feedrec.models.ranker import Ranker, RankerConfig, RankerTrain
from feedrec.models.two_tower import TwoTower, TwoTowerConfig, TwoTowerTrain
from feedrec.runtime.peak_rss import peak_rss_mb
from feedrec.training.checkpoint import TrainState, restore_checkpoint, save_checkpoint
from feedrec.training.config import TrainConfig
from feedrec.training.sharding import describe_plan, gather_state_dict, shard
from feedrec.training.step_timer import StepTimer
from feedrec.training.warm_start import WarmStart


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


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RankerBatch | PairBatch,
    timer: StepTimer,
) -> torch.Tensor:
    """One optimisation step of a train wrapper (``RankerTrain``/``TwoTowerTrain``, sharded or
    not) on ``batch``, timed phase by phase. Returns the loss (0-d). On sharded tables the
    forward holds their input and output all-to-alls."""
    with timer.phase("forward"):
        loss, _ = model(batch)
    with timer.phase("backward"):
        optimizer.zero_grad()
        loss.backward()
    with timer.phase("optimizer"):
        optimizer.step()
    return loss


def _gather(values: list[np.ndarray]) -> np.ndarray:
    """Concatenate arrays from every rank (valid sets are small)."""
    local = np.concatenate(values) if values else np.zeros((0,))
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    return np.concatenate([v for v in everyone if len(v)])


def validate(
    model: nn.Module, cfg: TrainConfig, device: torch.device, batches: Iterable[Columns]
) -> dict[str, float]:
    """Collective: validation loss, and per-task AUC/logloss (ranker) or in-batch top-1 accuracy
    (two-tower), over this rank's ``batches`` gathered from every rank."""
    model.eval()
    losses, outputs, labels = [], [], []
    with torch.no_grad():
        for cols in batches:
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


def _fault_drill(cfg: TrainConfig, state: TrainState, rank: int, world: int) -> None:
    """Kill this worker process the hard way (no cleanup, like an OOM kill or a lost node)."""
    if cfg.fault_drill_step == state.global_step and state.restores == 0 and rank == world - 1:
        print(f"[fault drill] rank {rank} SIGKILLs itself at step {state.global_step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _report(
    metrics: dict[str, float],
    dmp: nn.Module,
    optimizer: CombinedOptimizer,
    state: TrainState,
    rank: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> None:
    """Every rank writes its shards into its own directory; Ray Train merges them."""
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), dmp, optimizer, state, rank=rank, weights=weights)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: shard, (resume,) train, validate and checkpoint.

    ``loop_config``: {"train": TrainConfig dict, "model_config": RankerConfig | TwoTowerConfig}.
    Checkpoints every ``checkpoint_every_steps`` and at each epoch end; a restarted worker group
    resumes from Ray Train's latest checkpoint at the same epoch and batch.
    """
    cfg = TrainConfig(**loop_config["train"])
    model_config: RankerConfig | TwoTowerConfig = loop_config["model_config"]
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    train_module, served = build_train_module(cfg, model_config)
    dmp, plan = shard(
        train_module, device, sparse_lr=cfg.sparse_lr, overrides=cfg.sharding_overrides
    )
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.dense_lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    collate = RankerBatch.from_columns if cfg.model == "ranker" else PairBatch.from_columns

    state = TrainState(plan=describe_plan(plan))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = restore_checkpoint(Path(ckpt_dir), dmp, optimizer)
        state.restores += 1
        if state.batches_done == 0 and len(state.history) > state.epoch:
            state.epoch += 1  # the checkpoint closed an epoch
        if rank == 0:
            print(
                f"[resume] epoch {state.epoch}, batch {state.batches_done}, "
                f"step {state.global_step} (restore #{state.restores})",
                flush=True,
            )
    else:
        if rank == 0:
            for row in state.plan:
                print(f"[sharding] {row['table']}: {row['sharding']} on ranks {row['ranks']}")
        warm_ref = loop_config.get("warm_start")
        if warm_ref is not None:  # a fresh start only: a resumed attempt has its checkpoint
            warm: WarmStart = ray.get(warm_ref)
            copied = warm.apply(served)
            print(f"[warm start] rank {rank}: {copied} values from {warm.source}", flush=True)

    train_shard = ray.train.get_dataset_shard("train")
    while state.epoch < cfg.epochs:
        epoch, skip = state.epoch, state.batches_done
        # Throughput clock starts at the first batch: Ray Data's pipeline spin-up is not training.
        started: float | None = None
        seen, loss_sum, steps = 0, 0.0, 0
        timer = StepTimer(device)
        batches = train_shard.iter_batches(
            batch_size=cfg.batch_size,
            batch_format="numpy",
            drop_last=True,  # every rank must run the same number of collective steps
            local_shuffle_buffer_size=cfg.batch_size * 4,
            local_shuffle_seed=cfg.seed + epoch,
        )
        for i, cols in enumerate(timer.batches(batches)):
            # Resuming mid-epoch: the data position is a batch count. The split is in order
            # (``feedrec.training.trainer.build_trainer``) and the shuffle seeded, so skipping
            # them skips the very rows the lost attempt had trained on.
            if i < skip:
                continue
            if cfg.steps_per_epoch and i >= cfg.steps_per_epoch:
                break  # every rank stops at the same batch: the shards are equal-sized
            _fault_drill(cfg, state, rank, world)
            started = started or time.perf_counter()
            with timer.phase("collate"):
                batch = collate(cols).to(device)
            loss = train_step(dmp, optimizer, batch, timer)
            loss_sum += loss.item()
            steps += 1
            seen += cfg.batch_size
            state.global_step += 1
            state.batches_done = i + 1
            if cfg.checkpoint_every_steps and state.global_step % cfg.checkpoint_every_steps == 0:
                progress = {"epoch": epoch, "step": state.global_step, "train_loss": loss.item()}
                _report(progress, dmp, optimizer, state, rank)
        elapsed = time.perf_counter() - (started or time.perf_counter())
        # Peak resident memory of the hungriest rank so far.
        rss = torch.tensor([peak_rss_mb()], device=device)
        dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        metrics = {
            "epoch": epoch,
            "step": state.global_step,
            "train_loss": loss_sum / max(steps, 1),
            "samples_per_s_per_worker": seen / max(elapsed, 1e-9),
            "peak_rss_mb": float(rss.item()),
            **timer.metrics(),  # this rank's
            **validate(
                dmp,
                cfg,
                device,
                ray.train.get_dataset_shard("valid").iter_batches(
                    batch_size=cfg.batch_size, batch_format="numpy"
                ),
            ),
        }
        state.history.append(metrics)
        state.batches_done = 0
        # DMP swaps sharded tables into the module tree in place, so `served` is the sharded model.
        weights = gather_state_dict(served)
        _report(metrics, dmp, optimizer, state, rank, weights=weights)
        state.epoch += 1
