from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from click.testing import CliRunner

from feedrec.cli import main

if TYPE_CHECKING:
    from conftest import BusRecords  # the shared fixture's type (tests/conftest.py)


def test_help_lists_every_stage() -> None:
    out = CliRunner().invoke(main, ["--help"]).output
    for cmd in ("generate", "preprocess", "train", "evaluate", "index", "serve", "feed", "demo"):
        assert cmd in out
    serve = CliRunner().invoke(main, ["serve", "--help"]).output
    for cmd in ("up", "down", "status", "run"):
        assert cmd in serve


def test_bad_override_names_the_field(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["generate", "--preset", "debug", "--run-dir", str(tmp_path), "--set", "n_users=-5"]
    )
    assert res.exit_code != 0 and "n_users" in res.output
    res = CliRunner().invoke(main, ["generate", "--run-dir", str(tmp_path), "--set", "bogus"])
    assert res.exit_code != 0 and "KEY=VALUE" in res.output


def test_stage_out_of_order_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["preprocess", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "feedrec generate" in res.output


def test_events_sink_compacts_a_bus_and_names_a_bad_one(tmp_path: Path) -> None:
    from feedrec.events.event_log import EventLog
    from feedrec.events.feed_event import served_record

    res = CliRunner().invoke(main, ["events", "sink", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "--bus" in res.output and "not an event bus" in res.output
    res = CliRunner().invoke(main, ["events", "sink", "--bus", "redis://h:notaport/0"])
    assert res.exit_code == 2 and "--bus" in res.output and "port" in res.output
    served = served_record(
        request_id="f" * 32,
        user_id=1,
        ts=6.5,
        received_at=100.0,
        variant="control",
        model_version="1",
        snapshot="day6-x",
        fallback=False,
        cold_start=False,
        latency_ms=10.0,
        items=[{"post_id": 3, "position": 0, "score": 0.5, "scores": {}, "propensity": 1.0}],
    )
    EventLog(tmp_path / "events").append([served])
    res = CliRunner().invoke(main, ["events", "sink", "--run-dir", str(tmp_path), "--flush"])
    assert res.exit_code == 0, res.output
    assert "1 feeds" in res.output and "1 exposure rows" in res.output
    assert (tmp_path / "world" / "live" / "exposures" / "day=6").is_dir()
    res = CliRunner().invoke(main, ["events", "sink", "--run-dir", str(tmp_path), "--keep-s", "1"])
    assert res.exit_code == 2 and "--keep-s" in res.output and "--retain" in res.output
    res = CliRunner().invoke(
        main, ["events", "sink", "--run-dir", str(tmp_path), "--retain", "--keep-s", "0"]
    )
    # One segment, the active one: retention never deletes it.
    assert res.exit_code == 0 and "keeps seq 0 on; dropped 0 segments" in res.output, res.output


def test_experiment_commands_name_what_is_missing_or_bad(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["experiments", "report", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "feedrec events sink" in res.output
    res = CliRunner().invoke(main, ["simulate", "--run-dir", str(tmp_path), "--set", "fatigue=2"])
    assert res.exit_code == 2 and "fatigue" in res.output
    res = CliRunner().invoke(main, ["simulate", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "preprocessed" in res.output


def test_off_policy_command_names_a_bad_candidate_and_a_log_without_exploration(
    tmp_path: Path, ranker_artifact: Callable[..., Path], bus_records: BusRecords
) -> None:
    from feedrec.events.event_log import EventLog

    bad = ["experiments", "ope", "--run-dir", str(tmp_path), "--candidate", f"x={tmp_path}"]
    res = CliRunner().invoke(main, bad)
    assert res.exit_code == 2 and "--candidate" in res.output
    assert "not a model artifact" in res.output
    model = ranker_artifact(tmp_path / "models" / "ranker")
    res = CliRunner().invoke(main, ["experiments", "ope", "--run-dir", str(tmp_path)])
    assert res.exit_code == 2 and "feedrec events sink" in res.output  # no exposure log yet
    # A feed of a variant that does not explore: no pool, nothing to evaluate from.
    EventLog(tmp_path / "events").append([bus_records.served("e" * 32, 1, [3], at=100.0)])
    assert CliRunner().invoke(main, ["events", "sink", "--run-dir", str(tmp_path), "--flush"])
    ope = ["experiments", "ope", "--run-dir", str(tmp_path), "--candidate", str(model)]
    res = CliRunner().invoke(main, ope)
    assert res.exit_code == 2 and "exploration.epsilon > 0" in res.output, res.output


def test_feature_store_commands_name_a_bad_url_or_a_missing_preprocess(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["features", "publish", "--run-dir", str(tmp_path), "--to", "redis://h:1/0"]
    )
    assert res.exit_code == 2 and "no preprocess output" in res.output and "--run-dir" in res.output
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text("{}")
    res = CliRunner().invoke(
        main, ["features", "publish", "--run-dir", str(tmp_path), "--to", "redis://h/x"]
    )
    assert (
        res.exit_code == 2 and "--to" in res.output and "database must be an integer" in res.output
    )
    res = CliRunner().invoke(main, ["serve", "up", "--feature-store", "redis://h/0?prefix="])
    assert (
        res.exit_code == 2 and "--feature-store" in res.output and "prefix must match" in res.output
    )


def test_serve_config_option_names_a_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "serve.yaml"
    bad.write_text(
        "applications: [{name: feed, import_path: 'a:b', deployments: "
        "[{name: Ingress, autoscaling_config: {min_replicas: -1}}]}]\n"
    )
    res = CliRunner().invoke(main, ["serve", "up", "--serve-config", str(bad)])
    assert res.exit_code == 2 and "--serve-config" in res.output
    assert "deployment Ingress" in res.output and "min_replicas" in res.output


def test_events_sink_follows_until_sigterm(tmp_path: Path, bus_records: BusRecords) -> None:
    """``--follow-s``: a long-lived job (``ray job submit``); SIGTERM (``ray job stop``) ends
    it cleanly after its pass, with the feeds it saw written exactly once."""
    import signal
    import subprocess
    import sys
    import time

    from feedrec.events.event_log import EventLog
    from feedrec.runtime.ray_cluster import repo_root

    res = CliRunner().invoke(
        main, ["events", "sink", "--run-dir", str(tmp_path), "--follow-s", "1", "--flush"]
    )
    assert res.exit_code == 2 and "--follow-s" in res.output and "--flush" in res.output
    log = EventLog(tmp_path / "events")
    log.append([bus_records.served("a" * 32, 7, [100], at=1000.0)])
    log.append([bus_records.served("b" * 32, 8, [200], at=5000.0)])  # A's window closes
    # The Ray job entry point (`ray job submit -- python -m jobs.events sink ...`).
    cmd = [sys.executable, "-m", "jobs.events", "sink", "--run-dir", str(tmp_path)]
    proc = subprocess.Popen(
        [*cmd, "--follow-s", "0.2", "--retain"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=repo_root(),
    )
    try:
        deadline = time.monotonic() + 60
        exposures = tmp_path / "world" / "live" / "exposures"
        while not any(exposures.rglob("*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the sink job exited on its own"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert f"sink following {tmp_path / 'events'} every 0.2 s" in out
    assert "1 exposure rows from 1 feeds" in out and out.rstrip().endswith("sink stopped")
