"""Ray Tune with ASHA over the distributed trainer; the best trial becomes the artifact."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedrec.artifacts import load_artifact
from feedrec.data import PreprocessLayout
from feedrec.runtime import RunLayout
from feedrec.training.config import PRESETS
from feedrec.training.tuning import TuneConfig, tune_model


@pytest.mark.slow
def test_tune_picks_the_best_trial(debug_run: Path, tmp_path: Path) -> None:
    tune_cfg = TuneConfig(
        model="ranker",
        num_samples=2,
        max_epochs=2,
        grace_period=1,
        space={
            "train.dense_lr": {"type": "choice", "values": [1e-5, 3e-3]},
            "model.num_experts": {"type": "choice", "values": [2]},
        },
    )
    out = tune_model(
        tune_cfg,
        PRESETS["debug"]["ranker"],
        PreprocessLayout(RunLayout(debug_run).data),
        tmp_path / "ranker",
        storage_dir=tmp_path / "ray",
    )
    artifact = load_artifact(out)
    tuning = artifact.metadata["tuning"]
    assert len(tuning["trials"]) == 2 and not any(t["error"] for t in tuning["trials"])
    best = min(tuning["trials"], key=lambda t: t["valid_loss"])
    assert tuning["best_params"] == best["params"]
    assert artifact.metadata["train_config"]["dense_lr"] == best["params"]["train.dense_lr"]
    assert artifact.model_config.num_experts == 2  # type: ignore[union-attr]
    # The artifact's weights are the best trial's final epoch.
    assert artifact.metadata["history"][-1]["valid_loss"] == pytest.approx(best["valid_loss"])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"train.no_such": {"type": "choice", "values": [1]}}, "no such train config field"),
        ({"lr": {"type": "choice", "values": [1]}}, "train.X or model.X"),
        ({"train.dense_lr": {"type": "loguniform", "low": 0, "high": 1}}, "low < high"),
        ({"train.dense_lr": {"type": "normal"}}, "loguniform, uniform or choice"),
    ],
)
def test_bad_search_space_is_named(space: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TuneConfig(model="ranker", space=space)
