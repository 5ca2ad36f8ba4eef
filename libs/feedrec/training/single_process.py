"""The same models trained in one process with plain TorchRec (no Ray, no sharding).

This is the baseline of the training benchmark (``bench/train.py``) and a quick way to compare
architectures on one machine; production training goes through :func:`train_model`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from feedrec.data.examples import Columns, iter_column_batches
from feedrec.data.preprocess import PreprocessLayout
from feedrec.features.transform import FeatureTransform
from feedrec.features.vocabulary import Vocabularies
from feedrec.models.batch import PairBatch, RankerBatch
from feedrec.models.ranker import RankerConfig
from feedrec.models.two_tower import TwoTowerConfig
from feedrec.training.config import TrainConfig
from feedrec.training.loop import build_train_module, train_step
from feedrec.training.loop import validate as validation_metrics
from feedrec.training.sharding import gather_state_dict, shard
from feedrec.training.step_timer import StepTimer
from feedrec.training.trainer import (
    pair_columns,
    ranker_columns,
    two_tower_inputs,
)


@dataclass(frozen=True)
class SingleProcessResult:
    """History (one dict per epoch), overall training throughput, the trained (unsharded)
    served-module weights."""

    history: list[dict[str, float]]
    samples_per_s: float
    weights: dict[str, torch.Tensor]


def train_single_process(
    cfg: TrainConfig,
    data: PreprocessLayout,
    model_config: RankerConfig | TwoTowerConfig | None = None,
    *,
    max_steps: int | None = None,
    validate: bool = True,
) -> SingleProcessResult:
    """Train ``cfg.model`` on ``data`` in this process: the global batch of the distributed run
    (``batch_size x num_workers``), row-wise Adagrad on the tables, Adam on the dense layers."""
    torch.manual_seed(cfg.seed)
    vocabs = Vocabularies.load(data.vocabularies)
    transform = FeatureTransform(vocabs)
    if cfg.model == "ranker":
        config: RankerConfig | TwoTowerConfig = model_config or RankerConfig(
            num_rows=vocabs.num_rows()
        )
        path, to_cols = data.examples("train"), lambda t: ranker_columns(transform, t)
        valid_path, valid_cols = data.examples("valid"), to_cols
    else:
        config = model_config or TwoTowerConfig(num_rows=vocabs.num_rows())
        probability, negatives = two_tower_inputs(cfg, data)
        path, to_cols = data.pairs, lambda t: pair_columns(transform, t, probability, negatives)
        valid_path = data.examples("valid")

        def valid_cols(t: pa.Table) -> Columns:
            return pair_columns(transform, t.filter(_positive_mask(t)), probability, negatives)

    # One rank of TorchRec's own DMP: the fused FBGEMM embedding kernels and optimizer a
    # single-process TorchRec user gets, so the benchmark compares like with like.
    own_group = not dist.is_initialized()
    if own_group:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    train_module, served = build_train_module(cfg, config)
    dmp, _ = shard(train_module, torch.device("cpu"), sparse_lr=cfg.sparse_lr)
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.dense_lr),
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    batch_size = cfg.batch_size * cfg.num_workers
    history: list[dict[str, float]] = []
    steps, trained, train_seconds = 0, 0, 0.0
    for epoch in range(cfg.epochs):
        started: float | None = None  # from the first batch, as in the distributed loop
        loss_sum, epoch_steps = 0.0, 0
        batches = iter_column_batches(
            path, to_cols, batch_size, seed=cfg.seed + epoch, shuffle_buffer=batch_size * 4
        )
        collate = RankerBatch.from_columns if cfg.model == "ranker" else PairBatch.from_columns
        timer = StepTimer(torch.device("cpu"))
        for cols in timer.batches(batches):
            started = started or time.perf_counter()
            with timer.phase("collate"):
                batch = collate(cols)
            loss = train_step(dmp, optimizer, batch, timer)
            loss_sum += loss.item()
            epoch_steps += 1
            steps += 1
            trained += batch_size
            if max_steps is not None and steps >= max_steps:
                break
        elapsed = time.perf_counter() - (started or time.perf_counter())
        train_seconds += elapsed
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(epoch_steps, 1),
            "samples_per_s": epoch_steps * batch_size / max(elapsed, 1e-9),
            **timer.metrics(),
        }
        if validate:
            valid = iter_column_batches(valid_path, valid_cols, batch_size, seed=0, drop_last=False)
            metrics.update(validation_metrics(dmp, cfg, torch.device("cpu"), valid))
        history.append(metrics)
        if max_steps is not None and steps >= max_steps:
            break
    weights = gather_state_dict(served)
    if own_group:
        dist.destroy_process_group()
    assert weights is not None  # rank 0 of 1
    return SingleProcessResult(history, trained / max(train_seconds, 1e-9), weights)


def _positive_mask(table: pa.Table) -> np.ndarray:
    from feedrec.data.preprocess import POSITIVE_LABELS

    return np.logical_or.reduce([table.column(label).to_numpy() > 0 for label in POSITIVE_LABELS])
