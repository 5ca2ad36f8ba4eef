"""A worker killed mid-run: Ray Train restarts the group, which resumes from the checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from feedrec.artifacts import load_artifact
from feedrec.data import PreprocessLayout
from feedrec.runtime import RunLayout
from feedrec.training.config import PRESETS
from feedrec.training.trainer import train_model


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_result(debug_run: Path, tmp_path: Path) -> None:
    run = RunLayout(debug_run)
    data = PreprocessLayout(run.data)
    cfg = PRESETS["debug"]["ranker"].with_overrides(epochs=2, checkpoint_every_steps=10)

    base_artifact = load_artifact(
        train_model(cfg, data, tmp_path / "baseline", storage_dir=tmp_path / "ray")
    )
    baseline, baseline_version = base_artifact.metadata, base_artifact.version
    # The last rank SIGKILLs itself after 45 steps: in epoch 1 (an epoch here is 31 steps),
    # 5 steps after the checkpoint at step 40.
    drilled_artifact = load_artifact(
        train_model(
            cfg.with_overrides(fault_drill_step=45),
            data,
            tmp_path / "drilled",
            storage_dir=tmp_path / "ray",
        )
    )
    drilled, drilled_version = drilled_artifact.metadata, drilled_artifact.version

    assert baseline["restores"] == 0
    assert drilled["restores"] == 1
    # Same data position: resuming at step 40 (batch 9 of epoch 1), not from the start of training.
    assert drilled["global_steps"] == baseline["global_steps"]
    assert [h["epoch"] for h in drilled["history"]] == [0, 1]
    # The same result, bit for bit: training is reproducible (the split is in order; the
    # shuffle, negatives and initialisation are seeded), the checkpoint holds the sharded
    # model, both optimizers and the data position, and a resumed epoch replays the same rows.
    assert drilled_version == baseline_version  # the weights' sha256
    base, drill = baseline["history"][-1], drilled["history"][-1]
    for key in ("valid_loss", *(f"valid_auc_{t}" for t in ("like", "comment", "share", "hide"))):
        assert drill[key] == base[key], key
