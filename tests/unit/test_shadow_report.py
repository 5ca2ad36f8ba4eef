"""The shadow report on feeds that went through the real bus and sink: overlap, first-post
agreement and the engagement of served slots the shadow ranker keeps vs drops."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from feedrec.cli import main
from feedrec.events.event_log import EventLog
from feedrec.events.event_sink import EventSink
from feedrec.events.feed_recorder import FeedRecorder
from feedrec.experiments.experiment_report import read_exposures
from feedrec.experiments.shadow_report import analyse_shadow, read_shadow
from feedrec.schema.registry import TASKS
from feedrec.serving.shadow_feed import ShadowFeed

if TYPE_CHECKING:
    from conftest import BusRecords  # the shared fixture's type (tests/conftest.py)

USERS = (1, 2, 3, 4)


def _traffic(tmp_path: Path, bus_records: BusRecords) -> Path:
    """Each user: a served feed of 4 posts, all impressed, positions 0 and 1 liked (and 2
    for user 1); the shadow ranker keeps positions 0 and 1 and adds post 999. User 4's shadow
    feed also starts with another post. Returns the world the sink wrote."""
    log = EventLog(tmp_path / "bus")
    recorder = FeedRecorder(tmp_path / "bus", serving_day=30, snapshot="s")
    scores = {task: 0.5 for task in TASKS}
    now = time.time()
    for user in USERS:
        rid = f"{user:032x}"
        posts = [10 * user + i for i in range(4)]
        log.append([bus_records.served(rid, user, posts, at=now)])
        events = [
            bus_records.event(rid, "impression", p, posts[p], user, now + 1, f"i-{user}-{p}")
            for p in range(4)
        ]
        liked = (0, 1, 2) if user == 1 else (0, 1)
        events += [
            bus_records.event(rid, "like", p, posts[p], user, now + 2, f"l-{user}-{p}")
            for p in liked
        ]
        log.append(events)
        shadow = [posts[0], posts[1], 999] if user != 4 else [posts[1], posts[0], 999]
        feed = ShadowFeed(
            request_id=rid,
            user_id=user,
            variant="control",
            served_model_version="3",
            shadow_model_version="ranker-v4",
            served=posts,
            items=[{"post_id": p, "score": 0.5, "scores": scores} for p in shadow],
            latency_ms=10.0 * user,
        )
        asyncio.run(recorder.shadow(feed))
    world = tmp_path / "world"
    EventSink(log, world).run(flush=True)
    return world


def test_kept_and_dropped_slots_overlap_and_first_post(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    world = _traffic(tmp_path, bus_records)
    report = analyse_shadow(read_shadow(world), read_exposures(world))
    (c,) = report.comparisons
    assert (c.served_model_version, c.shadow_model_version) == ("3", "ranker-v4")
    assert (c.feeds, c.awaiting, c.users) == (4, 0, 4)
    assert c.overlap == [0.5] * 4 and c.top1_agreement == 0.75
    assert c.kept.value == pytest.approx(1.0) and c.kept.se == pytest.approx(0.0)
    assert c.dropped.value == pytest.approx(1 / 8)  # one liked of 8 dropped impressed slots
    assert c.dropped.ci[0] < 1 / 8 < c.dropped.ci[1]
    assert c.shadow_only == 1.0
    assert c.latency_p50_ms == pytest.approx(25.0)


def test_cli_writes_the_report_and_names_a_missing_shadow(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    world = _traffic(tmp_path, bus_records)
    out = tmp_path / "out"
    args = ["experiments", "shadow", "--run-dir", str(tmp_path / "run"), "--world-dir"]
    done = CliRunner().invoke(main, [*args, str(world), "--out-dir", str(out)])
    assert done.exit_code == 0, done.output
    assert "ranker-v4 shadowing 3: 4 feeds, overlap 0.500" in done.output
    saved = json.loads((out / "shadow.json").read_text())["comparisons"][0]
    assert saved["overlap"]["mean"] == 0.5 and saved["kept"]["value"] == pytest.approx(1.0)
    assert (out / "shadow.png").stat().st_size > 5_000 and "| 3 | ranker-v4 | 4 |" in (
        out / "shadow.md"
    ).read_text()
    missing = CliRunner().invoke(main, [*args, str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and "no shadow feeds" in missing.output
