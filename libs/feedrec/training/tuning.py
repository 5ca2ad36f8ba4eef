"""Ray Tune over the distributed trainer: every trial is a full Ray Train + TorchRec DMP run.

ASHA stops weak trials after ``grace_period`` epochs; the best trial's final checkpoint becomes
the model artifact, with the search space, every trial's result and the winning config in its
metadata.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from feedrec.data.preprocess import PreprocessLayout
from feedrec.features.vocabulary import Vocabularies
from feedrec.training.config import ModelKind, TrainConfig
from feedrec.training.trainer import artifact_from_checkpoint, build_trainer, model_config_for

#: A search dimension: {"type": "loguniform"|"uniform", "low": x, "high": y} or
#: {"type": "choice", "values": [...]}; names are ``train.<TrainConfig field>`` or
#: ``model.<RankerConfig/TwoTowerConfig field>``.
Dimension = dict[str, Any]


def _default_space(model: ModelKind) -> dict[str, Dimension]:
    if model == "ranker":
        return {
            "train.dense_lr": {"type": "loguniform", "low": 5e-4, "high": 5e-3},
            "train.sparse_lr": {"type": "loguniform", "low": 0.01, "high": 0.2},
            "model.num_experts": {"type": "choice", "values": [2, 4, 6]},
            "model.cross_layers": {"type": "choice", "values": [1, 2, 3]},
        }
    return {
        "train.dense_lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
        "model.temperature": {"type": "loguniform", "low": 0.02, "high": 0.2},
        "model.embedding_dim": {"type": "choice", "values": [32, 64]},
    }


@dataclass(frozen=True)
class TuneConfig:
    """How to tune one model.

    Args:
        model: which model.
        num_samples: trials drawn from ``space``.
        max_epochs: epochs of a trial that ASHA never stops.
        grace_period: epochs every trial gets before ASHA may stop it.
        reduction_factor: ASHA keeps the best 1/reduction_factor at each rung.
        metric, mode: what "best" means (reported by the trainer every epoch).
        max_concurrent: trials at once; each trial is ``num_workers`` DMP workers, so 1 fits a
            2-core machine and a GPU cluster can raise it.
        space: the search space (see ``Dimension``); defaults per model.
    """

    model: ModelKind
    num_samples: int = 4
    max_epochs: int = 2
    grace_period: int = 1
    reduction_factor: int = 2
    metric: str = "valid_loss"
    mode: Literal["min", "max"] = "min"
    max_concurrent: int = 1
    space: dict[str, Dimension] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.space:
            object.__setattr__(self, "space", _default_space(self.model))
        for name in ("num_samples", "max_epochs", "grace_period", "max_concurrent"):
            if getattr(self, name) < 1:
                raise ValueError(f"tune config: {name} must be >= 1")
        if self.grace_period > self.max_epochs or self.reduction_factor < 2:
            raise ValueError("tune config: need grace_period <= max_epochs, reduction_factor >= 2")
        if self.mode not in ("min", "max"):
            raise ValueError(f"tune config: mode must be min or max, not {self.mode!r}")
        train_fields = set(asdict(TrainConfig(self.model)))
        for name, dim in self.space.items():
            scope, _, key = name.partition(".")
            if scope not in ("train", "model") or not key:
                raise ValueError(f"tune config: space key {name!r} must be train.X or model.X")
            if scope == "train" and key not in train_fields:
                raise ValueError(f"tune config: space key {name!r}: no such train config field")
            kind = dim.get("type")
            if kind in ("loguniform", "uniform"):
                low, high = float(dim["low"]), float(dim["high"])
                if low >= high or (kind == "loguniform" and low <= 0):
                    raise ValueError(f"tune config: {name}: need low < high (and 0 < low for log)")
            elif kind != "choice" or not dim.get("values"):
                raise ValueError(f"tune config: {name}: type must be loguniform, uniform or choice")

    def param_space(self) -> dict[str, Any]:
        """The space as Ray Tune sampling objects."""
        from ray import tune

        out: dict[str, Any] = {}
        for name, dim in self.space.items():
            if dim["type"] == "loguniform":
                out[name] = tune.loguniform(float(dim["low"]), float(dim["high"]))
            elif dim["type"] == "uniform":
                out[name] = tune.uniform(float(dim["low"]), float(dim["high"]))
            else:
                out[name] = tune.choice(list(dim["values"]))
        return out


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``{"train.x": 1, "y": 2, "model.z": 3}`` -> ({"x": 1, "y": 2}, {"z": 3}): TrainConfig
    overrides (``train.`` prefix optional) and model config overrides (``model.`` prefix)."""
    train = {k.removeprefix("train."): v for k, v in params.items() if not k.startswith("model.")}
    model = {k.removeprefix("model."): v for k, v in params.items() if k.startswith("model.")}
    return train, model


def _searched(config: dict[str, Any]) -> dict[str, Any]:
    """The searched parameters of a trial config (``train.*`` and ``model.*`` keys)."""
    return {k: v for k, v in config.items() if k.startswith(("train.", "model."))}


def _trial(config: dict[str, Any]) -> None:
    """One Tune trial: a full distributed training run reporting every epoch to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    train_overrides, model_overrides = split_params(_searched(config))
    cfg = TrainConfig(**config["base"]).with_overrides(**train_overrides)
    data = PreprocessLayout(Path(config["data"]))
    model_config = model_config_for(cfg, Vocabularies.load(data.vocabularies), model_overrides)
    trainer = build_trainer(
        cfg,
        data,
        model_config,
        storage_dir=Path(config["storage"]),
        name=f"trial-{tune.get_context().get_trial_id()}",
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def tune_model(
    tune_cfg: TuneConfig,
    base: TrainConfig,
    data: PreprocessLayout,
    artifact_dir: Path,
    *,
    storage_dir: Path,
) -> Path:
    """Search ``tune_cfg.space`` around ``base``; write the best trial's model artifact."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    started = time.perf_counter()
    base = base.with_overrides(epochs=tune_cfg.max_epochs, checkpoint_every_steps=0)
    storage = Path(storage_dir).resolve()
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=tune_cfg.max_epochs,
        grace_period=tune_cfg.grace_period,
        reduction_factor=tune_cfg.reduction_factor,
    )
    space = {
        **tune_cfg.param_space(),
        "base": base.to_dict(),
        "data": str(Path(data.root).resolve()),
        "storage": str(storage / "trials"),
    }
    tuner = tune.Tuner(
        # The trial itself only waits on its TorchTrainer, whose workers hold the CPUs (Tune
        # refuses an empty request, hence a sliver).
        tune.with_resources(_trial, {"CPU": 0.01}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=tune_cfg.metric,
            mode=tune_cfg.mode,
            scheduler=scheduler,
            # Trials are drawn from the base config's seed: one seed, one sequence of trials.
            # The generator limits concurrency itself (Tune ignores max_concurrent_trials when
            # given a generator).
            search_alg=BasicVariantGenerator(
                random_state=base.seed, max_concurrent=tune_cfg.max_concurrent
            ),
            num_samples=tune_cfg.num_samples,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{base.model}-{int(time.time())}", storage_path=str(storage)
        ),
    )
    results = tuner.fit()
    best = results.get_best_result(metric=tune_cfg.metric, mode=tune_cfg.mode, scope="last")
    if best.metrics is None or "checkpoint_path" not in best.metrics:
        raise RuntimeError(f"tuning {base.model}: the best trial has no checkpoint ({best.error})")
    trials = []
    for i in range(len(results)):
        result = results[i]
        params = _searched(result.config or {})
        metrics = result.metrics or {}
        trials.append(
            {
                "params": params,
                "epochs": metrics.get("training_iteration"),
                tune_cfg.metric: metrics.get(tune_cfg.metric),
                "error": str(result.error) if result.error else None,
            }
        )
    best_params = _searched(best.config or {})
    train_overrides, model_overrides = split_params(best_params)
    cfg = base.with_overrides(**train_overrides)
    model_config = model_config_for(cfg, Vocabularies.load(data.vocabularies), model_overrides)
    return artifact_from_checkpoint(
        Path(best.metrics["checkpoint_path"]),
        cfg,
        data,
        model_config,
        artifact_dir,
        extra_metadata={
            "train_seconds": round(time.perf_counter() - started, 1),
            "model_overrides": model_overrides,
            "tuning": {
                "config": asdict(tune_cfg),
                "best_params": best_params,
                "best_metric": best.metrics.get(tune_cfg.metric),
                "trials": trials,
            },
        },
    )
