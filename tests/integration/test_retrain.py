"""Continual training: a drifted new day -> retrain (warm-started from production) ->
registered, and promoted only through the gate against production evaluated on the same test
day."""

import json
import shutil
from pathlib import Path

from feedrec import pipeline
from feedrec.artifacts import load_artifact
from feedrec.artifacts.model_registry import ModelRegistry, PromotionGate, flat_metrics
from feedrec.runtime import RunLayout


def test_retrain_on_a_drifted_day_registers_and_gates(trained_run: Path, tmp_path: Path) -> None:
    run = RunLayout(tmp_path / "run")
    shutil.copytree(trained_run, run.root, ignore=shutil.ignore_patterns("serve", "ray_results"))
    pipeline.evaluate(run)
    registry = ModelRegistry(tmp_path / "registry")
    pipeline.register(run, registry.root, promote=True)
    days_before = registry.entry("ranker", 1).data_snapshot["log_days"]

    out = pipeline.retrain(
        run, registry.root, append_days=1, drift=0.6, seed=1, warm_start=True, echo=print
    )

    for name in ("ranker", "retrieval"):
        new = registry.entry(name, 2)
        # Warm-started from production (v1): every table kept rows of ids it still knows.
        warm = load_artifact(new.path).metadata["warm_start"]
        assert warm["source"] == registry.entry(name, 1).artifact_version, warm
        assert warm["carried_rows"] and all(n >= 1 for n in warm["carried_rows"].values())
        if name == "ranker":  # the id tables (the two towers have none: see the registry)
            assert warm["carried_rows"]["user"] > 1 and warm["carried_rows"]["post"] > 1
        assert new.data_snapshot["log_days"] == [*days_before, days_before[-1] + 1]
        assert new.metrics and new.artifact_version
        champion = flat_metrics(
            name, json.loads((run.root / "eval_production" / "metrics.json").read_text())
        )
        failures = PromotionGate().check(new.metrics, champion)
        promoted = registry.production_version(name) == 2
        assert promoted == (not failures), (name, failures, out)
        assert (f"{name}: production v1 -> v2" in out) == promoted, out
