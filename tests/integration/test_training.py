"""Ray Train + TorchRec training artifacts on the debug world."""

from __future__ import annotations

import math
from pathlib import Path

from feedrec.artifacts import load_artifact
from feedrec.runtime import RunLayout


def test_ranker_artifact(trained_run: Path) -> None:
    art = load_artifact(RunLayout(trained_run).ranker)
    meta = art.metadata
    assert meta["device"] == "cpu" and meta["train_config"]["num_workers"] == 2
    assert len(meta["history"]) == meta["train_config"]["epochs"]
    last = meta["history"][-1]
    for task in ("like", "comment", "share", "hide"):
        assert 0.0 <= last[f"valid_auc_{task}"] <= 1.0
        assert math.isfinite(last[f"valid_logloss_{task}"])
    shardings = {row["sharding"] for row in meta["sharding_plan"]}
    assert shardings <= {"table_wise", "column_wise", "data_parallel"}
    assert {row["table"] for row in meta["sharding_plan"]} == {
        f"ranker_{t}" for t in ("user", "segment", "topic", "post", "creator", "media")
    }
    assert art.build_model() is not None


def test_two_tower_learns_something(trained_run: Path) -> None:
    art = load_artifact(RunLayout(trained_run).two_tower)
    history = art.metadata["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_retrieval_artifact_has_index(trained_run: Path) -> None:
    from feedrec.retrieval.build import load_post_index

    art = load_artifact(RunLayout(trained_run).retrieval)
    index = load_post_index(art)
    assert len(index) == art.metadata["index"]["posts"] > 0
