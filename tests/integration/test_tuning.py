"""Ray Tune with ASHA over the distributed trainer; the best trial becomes the artifact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from feedrec.artifacts import load_artifact
from feedrec.data import PreprocessLayout
from feedrec.runtime import RunLayout
from feedrec.training.config import PRESETS
from feedrec.training.tuning import TuneConfig, tune_model


def _live_placement_groups(ignore: set[str]) -> set[str]:
    """Placement groups not removed, except those in ``ignore``."""
    from ray.util import placement_group_table

    return {
        pg_id
        for pg_id, pg in placement_group_table().items()
        if pg_id not in ignore and pg["state"] != "REMOVED"
    }


@pytest.mark.slow
def test_tune_picks_the_best_trial_and_frees_every_trials_workers(
    debug_run: Path, tmp_path: Path
) -> None:
    # Three trials, one at a time (this machine has 2 CPUs and a trial takes both): ASHA stops
    # the weak learning rate after its first epoch, and the trial after it must still get the
    # CPUs. With Ray Train V2 under Tune, a stopped trial's worker placement group once
    # outlived it (ray-project/ray#54305) and the next trial waited forever.
    from ray.util import placement_group_table

    before = set(placement_group_table())
    tune_cfg = TuneConfig(
        model="ranker",
        num_samples=3,
        max_epochs=2,
        grace_period=1,
        space={
            "train.dense_lr": {"type": "choice", "values": [1e-5, 3e-3]},
            "model.num_experts": {"type": "choice", "values": [2]},
        },
    )
    out = tune_model(
        tune_cfg,
        PRESETS["debug"]["ranker"].with_overrides(seed=2),
        PreprocessLayout(RunLayout(debug_run).data),
        tmp_path / "ranker",
        storage_dir=tmp_path / "ray",
    )
    artifact = load_artifact(out)
    tuning = artifact.metadata["tuning"]
    trials = tuning["trials"]
    assert len(trials) == 3 and not any(t["error"] for t in trials)
    # Seed 2 draws learning rates 3e-3, 1e-5, 1e-5: ASHA stops a weak trial that is not the
    # last one, and a trial runs after it.
    assert [t["params"]["train.dense_lr"] for t in trials] == [3e-3, 1e-5, 1e-5]
    stopped = [i for i, t in enumerate(trials) if t["epochs"] == 1]
    assert stopped and stopped[0] < len(trials) - 1, trials
    best = min(trials, key=lambda t: t["valid_loss"])
    assert tuning["best_params"] == best["params"]
    assert artifact.metadata["train_config"]["dense_lr"] == best["params"]["train.dense_lr"]
    assert artifact.model_config.num_experts == 2  # type: ignore[union-attr]
    # The artifact's weights are the best trial's final epoch.
    assert artifact.metadata["history"][-1]["valid_loss"] == pytest.approx(best["valid_loss"])
    # Every trial's placement groups are gone (Train's cleaner works asynchronously).
    deadline = time.monotonic() + 60
    while _live_placement_groups(before) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _live_placement_groups(before)
