"""bench/report.py on synthetic results: headline, baseline, ratio, goal, "not run", errors."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from feedrec.runtime.ray_cluster import repo_root

# bench/ holds entry points, not an installed package: load the module from its file.
_spec = importlib.util.spec_from_file_location("bench_report", repo_root() / "bench" / "report.py")
assert _spec is not None and _spec.loader is not None
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report  # dataclasses look their module up while the class is built
_spec.loader.exec_module(report)

TRAIN = {"ray_dmp_samples_per_s": 1300.0, "single_samples_per_s": 1000.0, "workers": 2}
SERVE = {"rps_at_p99_100ms": 160.0, "twin_rps": 200.0, "p50_ms": 20.0, "host": {"cpus": 4}}
ANN = {"qps": 300.0, "exact_qps": 10.0, "recall_at_100": 0.96, "index": "IVF64,Flat"}
SPIKE = {
    "base_rps": 3,
    "spike_rps": 30,
    "p99_before_ms": 50.0,
    "p99_during_ms": 150.0,
    "p99_after_ms": 60.0,
    "errors": 0,
}


FEATURES = {
    "embedded": {"requests_per_s": 800.0, "p50_ms": 1.2},
    "redis": {"requests_per_s": 400.0, "p50_ms": 2.4},
    "workload": {"retrieve_k": 1000, "rank_k": 500},
}

SINK = {
    "rss_ratio": 1.25,
    "sink_over_read_speed": 0.2,
    "sizes": {
        "small": {"feeds": 10_000, "sink": {"peak_rss_mb": 560.0, "records_per_s": 2100.0}},
        "large": {"feeds": 40_000, "sink": {"peak_rss_mb": 700.0, "records_per_s": 2200.0}},
    },
    "host": {"cpus": 2},
}

SIGNALS = {
    "scale": 4,
    "start_growth": {"replay": 4.2, "restore": 1.4},
    "sizes": {
        "long": {
            "feeds": 80_000,
            "replay": {"start_s": 20.0},
            "restore": {"start_s": 4.0},
            "index": {"start_s": 0.25},
            "index_scan": {"start_s": 1.5},
        }
    },
    "host": {"cpus": 2},
}


def _write(d: Path, **files: Any) -> Path:
    for name, doc in files.items():
        (d / f"{name}.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return d


def test_rows_compare_with_baselines_and_goals(tmp_path: Path) -> None:
    data = {"ray_data_rows_per_s": 70.0, "single_rows_per_s": 100.0, "ratio": 0.7}
    overload = {**SPIKE, "shed_with_retry_after": 250, "first_scale_up_s": 50.0}
    overload["p99_back_under_target_s_after_scale_up"] = 31.0
    scaled = {**SPIKE, "p99_during_ms": 300.0, "max_replicas": {"Ingress": 4}}
    serve = {**SERVE, "ann": ANN, "spike": SPIKE, "spike_overload": overload}
    serve |= {"spike_scaleup": scaled, "spike_scaleup_baseline": SPIKE}
    rows = {
        r.name: r
        for r in report.collect(
            _write(
                tmp_path,
                train=TRAIN,
                data=data,
                serve=serve,
                feature_store=FEATURES,
                sink=SINK,
                signals=SIGNALS,
            )
        )
    }
    names = ["train", "serve", "ann", "spike", "spike_overload", "spike_policy", "data"]
    names += ["features", "sink", "signals"]
    assert [r.name for r in rows.values()] == names
    assert rows["train"].ratio == pytest.approx(1.3) and rows["train"].met is True  # >= 1.3
    assert "1,300 samples/s" in rows["train"].headline
    assert "1,000 samples/s" in rows["train"].baseline
    # 160 / 200 = 0.8 >= 0.7 and 160 >= 150 req/s
    assert rows["serve"].ratio == pytest.approx(0.8) and rows["serve"].met is True
    # 30x exact at recall 0.96: both ANN goals met
    assert rows["ann"].ratio == pytest.approx(30.0) and rows["ann"].met is True
    # No errors and no scale-up: met; after a scale-up p99 took 31 s > 30 s to recover: not met.
    assert rows["spike"].ratio == pytest.approx(3.0) and rows["spike"].met is True
    assert "no scale-up" in rows["spike"].detail
    assert rows["spike_overload"].met is False and "250 shed" in rows["spike_overload"].headline
    assert "first scale-up 50 s in, p99 < 100 ms again 31 s later" in rows["spike_overload"].detail
    # The cluster policy's step against the laptop config's: 300 / 150 ms, no goal.
    assert rows["spike_policy"].ratio == pytest.approx(2.0) and rows["spike_policy"].met is None
    assert "Ingress up to 4" in rows["spike_policy"].headline
    assert "p99 150 ms" in rows["spike_policy"].baseline
    assert rows["data"].ratio == pytest.approx(0.7) and rows["data"].met is False  # < 0.8
    assert "`ray_data_rows_per_s` 70" in rows["data"].headline
    assert rows["features"].ratio == pytest.approx(0.5) and rows["features"].met is None
    assert "400 req/s (p50 2.40 ms)" in rows["features"].headline
    # 700 / 560 MB = 1.25: at the goal, met; the sink's speed is shown, not judged.
    assert rows["sink"].ratio == pytest.approx(1.25) and rows["sink"].met is True
    assert "700 MB on 40,000 open feeds" in rows["sink"].headline
    assert "0.20x a bare parse" in rows["sink"].detail
    # 20 s replaying / 4 s from the snapshot: shown, no goal.
    assert rows["signals"].ratio == pytest.approx(5.0) and rows["signals"].met is None
    assert "4.00 s on a 80,000-feed bus" in rows["signals"].headline
    assert "grew 1.40x from the snapshot, 4.20x replaying" in rows["signals"].detail
    assert "key index 0.25 s from the key files, 1.50 s scanning" in rows["signals"].detail


def test_a_sink_whose_memory_grows_with_the_backlog_misses_its_goal(tmp_path: Path) -> None:
    grown = json.loads(json.dumps(SINK))
    grown["sizes"]["large"]["sink"]["peak_rss_mb"] = 2000.0
    grown["rss_ratio"] = 2000.0 / 560.0
    rows = {r.name: r for r in report.collect(_write(tmp_path, sink=grown))}
    assert rows["sink"].met is False


def test_a_spike_whose_p99_recovers_only_after_the_step_misses_the_goal(tmp_path: Path) -> None:
    overload = {**SPIKE, "first_scale_up_s": 61.3, "p99_back_under_target_s_after_scale_up": None}
    overload["p99_back_under_target_s_after_scale_up_any_load"] = 23.7
    serve = {**SERVE, "ann": ANN, "spike": SPIKE, "spike_overload": overload}
    rows = {r.name: r for r in report.collect(_write(tmp_path, serve=serve))}
    # 23.7 s is inside the 30 s goal, but the load had dropped by then: not met.
    assert rows["spike_overload"].met is False
    assert (
        "p99 < 100 ms again never under the step's load (23.7 s later, after the step)"
        in rows["spike_overload"].detail
    )


def test_goals_not_met(tmp_path: Path) -> None:
    serve = {**SERVE, "rps_at_p99_100ms": 140.0, "twin_rps": 150.0, "ann": {**ANN, "qps": 150}}
    train = {**TRAIN, "single_samples_per_s": 1001.0}
    rows = {r.name: r for r in report.collect(_write(tmp_path, train=train, serve=serve))}
    assert rows["train"].met is False  # 1300 / 1001 < 1.3
    assert rows["serve"].met is False  # ratio 0.93 but 140 < 150 req/s
    assert rows["ann"].met is False  # 15x < 20x


def test_a_ratio_just_under_its_goal_does_not_print_as_the_goal(tmp_path: Path) -> None:
    serve = {**SERVE, "rps_at_p99_100ms": 160.0, "twin_rps": 229.9}  # 0.696 < 0.7
    rows = report.collect(_write(tmp_path, serve=serve))
    text = report.render(rows, "2 CPUs", dt.date(2026, 1, 2), tmp_path)
    (line,) = [x for x in text.splitlines() if x.startswith("| serve |")]
    assert "| 0.696x |" in line and "| not met |" in line


def test_missing_benchmarks_are_not_run(tmp_path: Path) -> None:
    rows = report.collect(_write(tmp_path, serve={"ann": ANN}))  # only bench-ann has run
    status = {r.name: r.headline for r in rows}
    assert status == {
        "train": "not run",
        "serve": "not run",
        "ann": status["ann"],
        "spike": "not run",
        "spike_overload": "not run",
        "spike_policy": "not run",
        "data": "not run",
        "features": "not run",
        "sink": "not run",
        "signals": "not run",
    }
    assert status["ann"].startswith("IVF64,Flat")
    text = report.render(rows, "2 CPUs", dt.date(2026, 1, 2), tmp_path)
    assert "on 2026-01-02" in text and "Machine: 2 CPUs." in text
    assert "| data | not run |  |  | ratio >= 0.8 | not run | `data.json` |" in text


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"train": {"ray_dmp_samples_per_s": 1.0}}, r"train\.json: key 'single_samples_per_s'"),
        ({"train": "{oops"}, r"train\.json: not valid JSON"),
        ({"serve": {**SERVE, "twin_rps": "fast"}}, r"'twin_rps' must be a number, got 'fast'"),
        ({"serve": {"ann": 3}}, r"serve\.json: ann: expected a JSON object"),
        (
            {"serve": {"spike": {**SPIKE, "first_scale_up_s": "soon"}}},
            r"serve\.json: spike: key 'first_scale_up_s' must be a number",
        ),
        ({"feature_store": {"redis": {}}}, r"feature_store\.json: key 'redis\.requests_per_s'"),
    ],
)
def test_ill_formed_files_name_file_and_key(
    tmp_path: Path, files: dict[str, Any], match: str
) -> None:
    with pytest.raises(report.ReportError, match=match):
        report.collect(_write(tmp_path, **files))


def test_machine_from_proc(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n")
    (tmp_path / "meminfo").write_text("MemTotal:       25165824 kB\nMemFree: 1 kB\n")
    assert "(Test CPU 9000), 24.0 GiB RAM" in report.machine_description(tmp_path)
    assert "unknown model" in report.machine_description(tmp_path / "missing")


def test_main_writes_the_report_and_refuses_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "REPORT.md"
    report.main(["--results", str(_write(tmp_path, train=TRAIN)), "--out", str(out)])
    assert "| train | Ray Train DMP x2: 1,300 samples/s |" in out.read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, train={"ray_dmp_samples_per_s": 1.0})
    with pytest.raises(SystemExit) as exc:
        report.main(["--results", str(bad), "--out", str(bad / "REPORT.md")])
    assert exc.value.code == 2 and not (bad / "REPORT.md").exists()
