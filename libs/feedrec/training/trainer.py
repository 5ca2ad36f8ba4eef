"""Driver side: Ray Data inputs, ``TorchTrainer`` with DMP workers, the model artifact."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import ray.train
import torch
from ray.data import ExecutionOptions
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from feedrec.artifacts import save_artifact
from feedrec.artifacts.artifact import RANKER_ONNX
from feedrec.data.examples import columns_from_arrow, iter_column_batches
from feedrec.data.preprocess import PreprocessLayout, is_positive
from feedrec.evaluation.metrics import expected_calibration_error
from feedrec.features.tables import FeatureTables
from feedrec.features.transform import FeatureTransform
from feedrec.features.vocabulary import Vocabularies
from feedrec.models.batch import BINARY_TASKS, RankerBatch
from feedrec.models.calibration import fit_calibration
from feedrec.models.portable_ranker import PortableRanker
from feedrec.models.ranker import Ranker, RankerConfig
from feedrec.models.two_tower import TwoTowerConfig
from feedrec.training.candidate_probability import CandidateProbability
from feedrec.training.checkpoint import read_final
from feedrec.training.config import TrainConfig
from feedrec.training.loop import train_loop_per_worker
from feedrec.training.negative_sampler import NegativeSampler
from feedrec.training.warm_start import WarmStart


def ranker_columns(transform: FeatureTransform, table: pa.Table) -> dict[str, np.ndarray]:
    """Examples -> ranker inputs + labels (a Ray Data batch)."""
    raw = columns_from_arrow(table)
    out = transform(raw, "ranker").to_columns()
    out.update({task: raw[task] for task in (*BINARY_TASKS, "dwell")})
    return out


def pair_columns(
    transform: FeatureTransform,
    table: pa.Table,
    probability: CandidateProbability,
    negatives: NegativeSampler | None = None,
) -> dict[str, np.ndarray]:
    """Positive pairs -> user-tower and item-tower inputs (prefixed ``user_`` / ``item_``) and
    each item's log chance to fill a candidate slot, ``item_log_q`` (``probability``).

    With ``negatives``, also one random eligible post per row (``neg_`` inputs, ``neg_log_q``).
    """
    raw = columns_from_arrow(table)
    out = transform(raw, "user_tower").to_columns("user_")
    out.update(transform(raw, "item_tower").to_columns("item_"))
    out["item_log_q"] = probability.log_q(raw["post_id"], raw["p_age_days"])
    if negatives is not None and len(table):
        # Seeded by the rows themselves: a run draws the same negatives whatever the worker
        # count or block order, so runs stay comparable.
        rng = np.random.default_rng(raw["impression_id"].astype(np.uint64))
        neg, drawn = negatives.sample(raw["day"], raw["ts"], rng)
        out.update(transform(neg, "item_tower").to_columns("neg_"))
        # An undrawn slot gets log q = +inf: its corrected logit is -inf, out of the softmax.
        log_q = probability.log_q(neg["post_id"], neg["p_age_days"])
        out["neg_log_q"] = np.where(drawn, log_q, np.inf).astype(np.float32)
    return out


def candidate_probability(
    data: PreprocessLayout, n_posts: int, negatives: NegativeSampler | None = None
) -> CandidateProbability:
    """What the logQ correction subtracts, from the training positives (``data.pairs``) and,
    with mixed negatives, one seeded random draw per positive (for the draws' ages)."""
    pairs = pq.read_table(data.pairs, columns=["post_id", "day", "ts", "p_age_days"])
    post = pairs.column("post_id").to_numpy()
    age = pairs.column("p_age_days").to_numpy()
    if negatives is None:
        return CandidateProbability.of(post, age, n_posts)
    day = pairs.column("day").to_numpy()
    days, rows = np.unique(day, return_counts=True)
    proposal = negatives.log_proposal(dict(zip(days.tolist(), rows.tolist(), strict=True)))
    drawn_cols, drawn = negatives.sample(
        day, pairs.column("ts").to_numpy(), np.random.default_rng(0)
    )
    random_age = drawn_cols["p_age_days"][drawn]
    return CandidateProbability.of(post, age, n_posts, proposal, random_age)


def two_tower_inputs(
    cfg: TrainConfig, data: PreprocessLayout
) -> tuple[CandidateProbability, NegativeSampler | None]:
    """What the two-tower's rows need besides the transform: the logQ correction and, with
    ``cfg.mixed_negatives``, the random-negative sampler (one read of the preprocess meta)."""
    world = data.read_meta()["world"]
    negatives = (
        NegativeSampler.of(
            FeatureTables.load_attributes(data.tables), float(world["post_lifetime_days"])
        )
        if cfg.mixed_negatives
        else None
    )
    return candidate_probability(data, int(world["n_posts"]), negatives), negatives


def training_datasets(
    cfg: TrainConfig, data: PreprocessLayout, transform: FeatureTransform
) -> dict[str, ray.data.Dataset | Callable[[], ray.data.Dataset]]:
    """Streaming Ray Datasets of transformed training and validation rows."""
    valid = ray.data.read_parquet(str(data.examples("valid")))
    if cfg.model == "ranker":
        train_path = data.examples("train")

        def fn(table: pa.Table) -> dict[str, np.ndarray]:
            return ranker_columns(transform, table)

    else:
        train_path, valid = data.pairs, valid.filter(expr=is_positive())
        probability, negatives = two_tower_inputs(cfg, data)
        # The sampler holds every post's attributes and the probability a few floats per post:
        # one copy of each in the object store, mapped zero-copy by each map task, instead of
        # one pickled into every task.
        probability_ref = ray.put(probability)
        negatives_ref = ray.put(negatives) if negatives is not None else None

        def fn(table: pa.Table) -> dict[str, np.ndarray]:
            sampler = ray.get(negatives_ref) if negatives_ref is not None else None
            return pair_columns(transform, table, ray.get(probability_ref), sampler)

    train = ray.data.read_parquet(str(train_path)).randomize_block_order(seed=cfg.seed)
    return {
        "train": train.map_batches(fn, batch_format="pyarrow", batch_size=8192),
        "valid": valid.map_batches(fn, batch_format="pyarrow", batch_size=8192),
    }


def calibrate_ranker(
    state_dict: dict[str, torch.Tensor],
    model_config: RankerConfig,
    data: PreprocessLayout,
    transform: FeatureTransform,
) -> dict[str, dict[str, float]]:
    """Fit per-head Platt calibration on the validation split; writes it into ``state_dict``.

    Streams the split through the unsharded ranker on the driver. Returns, per binary task, the
    fitted (scale, bias) and the validation ECE before and after.
    """
    model = Ranker(model_config)
    model.load_state_dict(state_dict)
    model.eval()
    logits, labels = [], []
    batches = iter_column_batches(
        data.examples("valid"),
        lambda t: ranker_columns(transform, t),
        8192,
        seed=0,
        drop_last=False,
    )
    with torch.inference_mode():
        for cols in batches:
            batch = RankerBatch.from_columns(cols)
            logits.append(model(batch.inputs.dense, batch.inputs.sparse)[:, : len(BINARY_TASKS)])
            labels.append(batch.labels)
    raw, y = torch.cat(logits).double().numpy(), torch.cat(labels).numpy()
    table = fit_calibration(raw, y)
    state_dict["calibration"] = torch.from_numpy(table)
    report = {}
    for i, task in enumerate(BINARY_TASKS):
        scale, bias = (float(v) for v in table[i])
        report[task] = {
            "scale": scale,
            "bias": bias,
            "valid_ece_before": expected_calibration_error(y[:, i], 1 / (1 + np.exp(-raw[:, i]))),
            "valid_ece_after": expected_calibration_error(
                y[:, i], 1 / (1 + np.exp(-(scale * raw[:, i] + bias)))
            ),
        }
    return report


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    return float(ray.cluster_resources().get("GPU", 0)) >= cfg.num_workers


def model_config_for(
    cfg: TrainConfig, vocabs: Vocabularies, overrides: dict[str, Any] | None = None
) -> RankerConfig | TwoTowerConfig:
    """The architecture of ``cfg.model`` sized by the vocabularies, with field overrides."""
    kwargs: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()
    }
    if cfg.model == "ranker":
        return RankerConfig(num_rows=vocabs.num_rows(), **kwargs)
    return TwoTowerConfig(num_rows=vocabs.num_rows(), **kwargs)


def build_trainer(
    cfg: TrainConfig,
    data: PreprocessLayout,
    model_config: RankerConfig | TwoTowerConfig,
    *,
    storage_dir: Path,
    name: str | None = None,
    callbacks: list[Any] | None = None,
    warm: WarmStart | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` of ``cfg.num_workers`` DMP workers (NCCL on GPUs, else gloo),
    starting from ``warm`` (through the object store) when given."""
    transform = FeatureTransform(Vocabularies.load(data.vocabularies))
    use_gpu = _use_gpu(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.to_dict(),
            "model_config": model_config,
            "warm_start": ray.put(warm) if warm is not None else None,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=training_datasets(cfg, data, transform),
        # In order, the split hands each rank the same blocks every run: with the seeded local
        # shuffle, the seeded negatives and the seeded initialisation, a run is reproducible.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name or f"{cfg.model}-{int(time.time())}",
            storage_path=str(Path(storage_dir).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
    )


def artifact_from_checkpoint(
    checkpoint_dir: Path,
    cfg: TrainConfig,
    data: PreprocessLayout,
    model_config: RankerConfig | TwoTowerConfig,
    artifact_dir: Path,
    *,
    extra_metadata: dict[str, Any] | None = None,
) -> Path:
    """Final (end-of-epoch) checkpoint -> calibrated model artifact with its full metadata."""
    vocabs = Vocabularies.load(data.vocabularies)
    state_dict, state = read_final(Path(checkpoint_dir))
    calibration = None
    if isinstance(model_config, RankerConfig):
        calibration = calibrate_ranker(state_dict, model_config, data, FeatureTransform(vocabs))
    metadata = {
        "train_config": cfg.to_dict(),
        "history": state.history,
        "sharding_plan": state.plan,
        "global_steps": state.global_step,
        "restores": state.restores,
        "calibration": calibration,
        "device": "cuda" if _use_gpu(cfg) else "cpu",
        "data": {"root": str(data.root), **data.read_meta()},
        "checkpoint": str(checkpoint_dir),
        "host_cpus": os.cpu_count(),
        **(extra_metadata or {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        extra_files = {}
        if isinstance(model_config, RankerConfig):
            # Exported once here, next to the weights it came from: every Triton instance that
            # loads this version (at a promotion, after a restart) reads it instead of
            # importing TorchRec and exporting again.
            ranker = Ranker(model_config)
            ranker.load_state_dict(state_dict)
            onnx_path = Path(tmp) / RANKER_ONNX
            try:
                error = PortableRanker(ranker.eval()).write_checked_onnx(onnx_path)
            except ValueError as e:
                raise ValueError(
                    f"{e}; no artifact written, the trained weights are in {checkpoint_dir}"
                ) from e
            metadata["onnx"] = {"file": RANKER_ONNX, "max_error_vs_eager": error}
            extra_files[RANKER_ONNX] = onnx_path
        return save_artifact(
            Path(artifact_dir),
            kind=cfg.model,
            state_dict=state_dict,
            model_config=model_config,
            vocabs=vocabs,
            metadata=metadata,
            extra_files=extra_files,
        )


def train_model(
    cfg: TrainConfig,
    data: PreprocessLayout,
    artifact_dir: Path,
    *,
    storage_dir: Path,
    model_overrides: dict[str, Any] | None = None,
) -> Path:
    """Train ``cfg.model`` with Ray Train on ``cfg.num_workers`` DMP workers; write the artifact.

    Returns the artifact directory (see ``feedrec.artifacts``).
    """
    started = time.perf_counter()
    vocabs = Vocabularies.load(data.vocabularies)
    model_config = model_config_for(cfg, vocabs, model_overrides)
    warm = None
    if cfg.warm_start is not None:
        warm = WarmStart.from_artifact(Path(cfg.warm_start), model_config, vocabs)
    result = build_trainer(cfg, data, model_config, storage_dir=storage_dir, warm=warm).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {cfg.model} produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        return artifact_from_checkpoint(
            Path(ckpt),
            cfg,
            data,
            model_config,
            artifact_dir,
            extra_metadata={
                "train_seconds": round(time.perf_counter() - started, 1),
                "model_overrides": model_overrides or {},
                "warm_start": (
                    {"source": warm.source, "carried_rows": warm.carried} if warm else None
                ),
            },
        )
