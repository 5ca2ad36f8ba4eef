"""The drift job end to end: append a day to copies of the debug world, preprocess, compare.

The debug world is too short for a training-time reference (its 6 days never fill the 7-day
feature windows, so windowed counts grow every day whatever drifts): the reference here is the
appended day of an undrifted copy, and the recent sample the same day of another copy, drifted or
not. ``tests/unit/test_drift.py`` covers the default training-days reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from feedrec import pipeline
from feedrec.cli import DRIFT_ALERT_EXIT, main
from feedrec.data import PreprocessLayout
from feedrec.runtime import RunLayout
from feedrec.schema import TASKS
from feedrec.world.generator import append_days


def _with_appended_day(run: Path, root: Path, drift: float, seed: int) -> RunLayout:
    """A copy of ``run``'s world (the shared run stays untouched) plus one day, preprocessed."""
    copy = RunLayout(root)
    shutil.copytree(RunLayout(run).world, copy.world)
    append_days(copy.world, 1, drift=drift, seed=seed)
    pipeline.preprocess(copy, options={"progress": False})
    return copy


def _drift(run: RunLayout, reference: RunLayout, ranker: Path) -> tuple[int, dict[str, Any]]:
    args = ["drift", "--run-dir", str(run.root), "--reference-run-dir", str(reference.root)]
    args += ["--reference-split", "test", "--ranker-dir", str(ranker)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code in (0, DRIFT_ALERT_EXIT), res.output
    return res.exit_code, json.loads((run.root / "drift" / "drift.json").read_text())


def test_drift_job_alerts_on_the_drifted_day_only(trained_run: Path, tmp_path: Path) -> None:
    baseline = _with_appended_day(trained_run, tmp_path / "baseline", drift=0.0, seed=1)
    calm = _with_appended_day(trained_run, tmp_path / "calm", drift=0.0, seed=2)
    drifted = _with_appended_day(trained_run, tmp_path / "drifted", drift=0.9, seed=2)
    meta = PreprocessLayout(drifted.data).read_meta()
    assert meta["test_days"] == [6] and meta["rows"]["test"] > 0.9 * 4000

    ranker = RunLayout(trained_run).ranker
    calm_code, calm_report = _drift(calm, baseline, ranker)
    drift_code, drift_report = _drift(drifted, baseline, ranker)

    assert calm_code == 0 and calm_report["alerts"] == [], calm_report["alerts"]
    assert drift_code == DRIFT_ALERT_EXIT and "topic" in drift_report["alerts"]
    for report in (calm_report, drift_report):
        assert report["recent"]["days"] == [6] and report["reference"]["days"] == [6]
    # Users whose interests moved are shown topics they have little history with.
    calm_rows = {f["name"]: f for f in calm_report["features"]}
    drift_rows = {f["name"]: f for f in drift_report["features"]}
    assert calm_rows["ut_imps_log"]["psi"] < 0.1 <= drift_rows["ut_imps_log"]["psi"]
    # The ranker's predictions are compared too, on both samples.
    for task in TASKS:
        assert drift_rows[f"pred_{task}"]["kind"] == "prediction"
        assert calm_rows[f"pred_{task}"]["status"] == "ok"
    assert "ALERT" in (drifted.root / "drift" / "drift.html").read_text()
