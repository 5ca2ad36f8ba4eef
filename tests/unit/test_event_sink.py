"""The sink: joins events to served feeds, writes logs exactly once, keeps what it rejects."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest

from feedrec.data.log_import import LOG_SCHEMA
from feedrec.events import event_sink
from feedrec.events.event_log import EventLog, EventLogError
from feedrec.events.event_sink import LIVE_ID_BASE, EventSink, SinkConfig, SinkReport
from feedrec.events.feed_event import feed_event
from feedrec.events.feed_recorder import FeedRecorder
from feedrec.schema.registry import TASKS
from feedrec.serving.shadow_feed import ShadowFeed

RID_A, RID_B = "a" * 32, "b" * 32
DAY = 30

if TYPE_CHECKING:
    from conftest import BusRecords  # the shared fixture's type (tests/conftest.py)


def _logs(world: Path) -> dict[int, dict[str, Any]]:
    files = sorted((world / "logs").rglob("*.parquet"))
    rows: dict[int, dict[str, Any]] = {}
    for f in files:
        table = pq.read_table(f, partitioning=None)
        assert table.schema.equals(LOG_SCHEMA), f"{f} is not in the preprocess log schema"
        for row in table.to_pylist():
            assert row["impression_id"] not in rows, "an impression was written twice"
            rows[row["impression_id"]] = row
    return rows


def _bus(tmp_path: Path) -> tuple[EventLog, Path]:
    return EventLog(tmp_path / "bus"), tmp_path / "world"


def test_events_join_their_impressions_into_log_rows(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    log.append([bus_records.served(RID_A, 7, [100, 101, 102], at=1000.0)])
    log.append(
        [
            bus_records.event(RID_A, "impression", 0, 100, 7, 1001.0, "imp-a-0"),
            bus_records.event(RID_A, "impression", 1, 101, 7, 1001.0, "imp-a-1"),
            bus_records.event(RID_A, "view", 0, 100, 7, 1002.0, "view-a-0"),
            bus_records.event(RID_A, "like", 0, 100, 7, 1003.0, "like-a-0"),
            bus_records.event(RID_A, "like", 0, 100, 7, 1003.5, "like-a-0-again"),  # a double tap
            bus_records.event(RID_A, "dwell", 0, 100, 7, 1004.0, "dwell-a-0", dwell_s=6.5),
            bus_records.event(RID_A, "dwell", 0, 100, 7, 1005.0, "dwell-a-0-b", dwell_s=3.0),
            bus_records.event(RID_A, "hide", 1, 101, 7, 1006.0, "hide-a-1"),
        ]
    )
    report = EventSink(log, world).run(flush=True)
    rows = _logs(world)
    assert report.log_rows == 2 and report.exposure_rows == 3 and report.feeds_written == 1
    first, second = (rows[LIVE_ID_BASE + 0 * 100 + p] for p in (0, 1))
    assert (first["user_id"], first["post_id"], first["position"]) == (7, 100, 0)
    assert (first["view"], first["like"], first["hide"], first["dwell"]) == (1, 1, 0, 6.5)
    assert (second["view"], second["like"], second["hide"], second["dwell"]) == (1, 0, 1, 0.0)
    assert first["ts"] == pytest.approx(DAY + 0.25) and first["propensity"] == 1.0
    assert (world / "logs" / f"day={DAY}").is_dir()
    exposures = pq.read_table(world / "live" / "exposures" / f"day={DAY}").to_pylist()
    assert [e["impressed"] for e in sorted(exposures, key=lambda e: e["position"])] == [1, 1, 0]
    assert {e["variant"] for e in exposures} == {"control"}
    assert exposures[0]["snapshot"] == "day30-abc" and exposures[0]["model_version"] == "3"


def test_a_feed_waits_for_its_window_and_late_events_are_kept_as_rejected(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    sink = EventSink(log, world, SinkConfig(attribution_window_s=60.0))
    log.append([bus_records.served(RID_A, 7, [100, 101], at=1000.0)])
    log.append([bus_records.event(RID_A, "impression", 0, 100, 7, 1010.0, "imp-a-0")])
    first = sink.run()
    assert first.feeds_written == 0 and first.pending_feeds == 1 and _logs(world) == {}
    # Traffic moves the watermark past the window: feed A is written with what it had.
    log.append([bus_records.served(RID_B, 8, [200], at=1070.0)])
    second = sink.run()
    assert second.feeds_written == 1 and len(_logs(world)) == 1
    # A like for A arrives after its window closed: rejected as late, not lost, not counted.
    log.append([bus_records.event(RID_A, "like", 0, 100, 7, 1080.0, "like-a-late")])
    third = sink.run()
    assert third.rejected == {"late": 1}
    assert _logs(world)[LIVE_ID_BASE]["like"] == 0
    rejected = [
        json.loads(line)
        for f in sorted((world / "live" / "rejected").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    assert [(r["type"], r["reason"].split(":")[0]) for r in rejected] == [("like", "late")]


def test_events_before_their_feed_unknown_feeds_and_mismatches(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    # An event may reach the bus before its feed's record (another replica wrote it later).
    log.append([bus_records.event(RID_A, "like", 1, 101, 7, 999.0, "like-early")])
    log.append([bus_records.served(RID_A, 7, [100, 101], at=1000.0)])
    log.append(
        [
            bus_records.event("c" * 32, "like", 0, 1, 2, 1001.0, "like-unknown"),
            bus_records.event(RID_A, "like", 0, 555, 7, 1001.0, "like-wrong-post"),
            bus_records.event(RID_A, "like", 0, 100, 8, 1001.0, "like-wrong-user"),
            bus_records.event(
                RID_A, "like", 0, 100, 7, 1001.0, "like-wrong-variant", variant="treatment"
            ),
            bus_records.event(RID_A, "like", 5, 100, 7, 1001.0, "like-no-slot"),
        ]
    )
    report = EventSink(log, world).run(flush=True)
    rows = _logs(world)
    assert list(rows) == [LIVE_ID_BASE + 1 * 100 + 1]  # the feed record has seq 1
    assert rows[LIVE_ID_BASE + 101]["like"] == 1
    assert report.rejected == {"mismatch": 4, "unknown request_id": 1}


def test_a_crash_before_commit_redoes_the_same_range_exactly_once(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    log.append([bus_records.served(RID_A, 7, [100, 101], at=1000.0)])
    log.append(
        [bus_records.event(RID_A, "impression", p, 100 + p, 7, 1001.0, f"imp-{p}") for p in (0, 1)]
    )
    sink = EventSink(log, world)
    crashed = sink.run(flush=True, crash_after_files=True)
    assert crashed.log_rows == 2
    files = sorted(p.name for p in world.rglob("*.parquet"))
    # More traffic arrives before the restart: it must not be folded into the redone range.
    log.append([bus_records.served(RID_B, 8, [200], at=1002.0)])
    log.append([bus_records.event(RID_B, "impression", 0, 200, 8, 1003.0, "imp-b")])
    redo = EventSink(log, world).run(flush=True)
    assert redo.next_seq == log.end_seq()
    rows = _logs(world)
    assert sorted(rows) == [LIVE_ID_BASE + 0, LIVE_ID_BASE + 1, LIVE_ID_BASE + 3 * 100]  # B: seq 3
    assert set(files) <= {p.name for p in world.rglob("*.parquet")}
    # Running again with nothing new writes nothing and changes nothing.
    again = EventSink(log, world).run(flush=True)
    assert again.records == 0 and _logs(world) == rows


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="attribution_window_s"):
        SinkConfig(attribution_window_s=0)
    with pytest.raises(ValueError, match="max_records"):
        SinkConfig(max_records=0)


def test_event_validation_names_the_problem() -> None:
    base = dict(
        type="like",
        request_id=RID_A,
        position=0,
        post_id=1,
        user_id=2,
        variant="control",
        idempotency_key="key-00001",
    )
    feed_event(**base)
    with pytest.raises(ValueError, match="dwell_s"):
        feed_event(**{**base, "type": "dwell"})
    with pytest.raises(ValueError, match="dwell_s"):
        feed_event(**{**base, "dwell_s": 3.0})
    with pytest.raises(ValueError, match="request_id"):
        feed_event(**{**base, "request_id": "not-a-request"})
    with pytest.raises(ValueError, match="position"):
        feed_event(**{**base, "position": 100})
    with pytest.raises(ValueError, match="type"):
        feed_event(**{**base, "type": "purchase"})


def test_closing_the_live_day_makes_it_a_day_of_the_world(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    from feedrec.world import PRESETS
    from feedrec.world.generator import append_days, read_appended
    from feedrec.world.layout import WorldLayout

    log, world = _bus(tmp_path)
    layout = WorldLayout(world)
    world.mkdir()
    layout.config.write_text(json.dumps(PRESETS["debug"].with_overrides(n_days=30).to_dict()))
    sink = EventSink(log, world)
    with pytest.raises(ValueError, match="no live rows"):
        sink.close_day()
    log.append([bus_records.served(RID_A, 7, [100], at=1000.0)])
    log.append([bus_records.event(RID_A, "impression", 0, 100, 7, 1001.0, "imp-a-0")])
    sink.run()
    with pytest.raises(ValueError, match="attribution window"):
        sink.close_day()
    sink.run(flush=True)
    with pytest.raises(ValueError, match="close that day first"):
        append_days(world)  # day 30 has live rows: the generator must not mix its own in
    assert sink.close_day() == DAY
    assert json.loads(layout.config.read_text())["n_days"] == DAY + 1
    assert read_appended(layout)["appends"][-1] == {"first_day": DAY, "n_days": 1, "source": "live"}


def test_an_exploring_feed_keeps_its_pool_and_propensities_in_the_exposures(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    """What off-policy evaluation reads: the pool and each slot's propensity; a record
    written before exploration existed (no pool key) reads as unexplored with no pool."""
    from feedrec.experiments.experiment_report import read_exposures

    log, world = _bus(tmp_path)
    explored = bus_records.served(RID_A, 7, [103, 100], at=1000.0, variant="explore")
    explored["pool"], explored["explored"] = [100, 101, 102, 103], True
    for item, mu in zip(explored["items"], [0.075, 0.775], strict=True):
        item["propensity"] = mu
    legacy = bus_records.served(RID_B, 8, [200], at=1000.0)
    del legacy["pool"], legacy["explored"]
    log.append([explored, legacy])
    EventSink(log, world).run(flush=True)
    rows = read_exposures(world).sort_values(["request_id", "position"])
    assert rows["pool"].map(list).tolist() == [[100, 101, 102, 103]] * 2 + [[]]
    assert rows["explored"].tolist() == [True, True, False]
    assert rows["propensity"].tolist() == pytest.approx([0.075, 0.775, 1.0])
    # A simulation reads only its own feeds (the rest of the world's traffic stays on disk).
    assert read_exposures(world, request_ids=[RID_B])["post_id"].tolist() == [200]
    assert read_exposures(world, request_ids=[]).empty


def test_shadow_feeds_become_shadow_rows_never_log_rows(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    log.append([bus_records.served(RID_A, 7, [100, 101, 102], at=time.time())])
    recorder = FeedRecorder(tmp_path / "bus", serving_day=DAY, snapshot="day30-abc")
    scores = {task: 0.25 for task in TASKS}
    feed = ShadowFeed(
        request_id=RID_A,
        user_id=7,
        variant="control",
        served_model_version="ranker-v1",
        shadow_model_version="ranker-v2",
        served=[100, 101, 102],
        items=[
            {"post_id": 102, "score": 0.9, "scores": scores},
            {"post_id": 555, "score": 0.4, "scores": scores},
        ],
        latency_ms=12.5,
    )
    assert feed.overlap == pytest.approx(1 / 3)
    asyncio.run(recorder.shadow(feed))
    asyncio.run(recorder.shadow(feed))  # a retried write: the bus keeps one
    # A shadow retrieval on the same request is a record of its own, not a duplicate.
    retrieval = ShadowFeed(
        **{
            **feed.__dict__,
            "served_model_version": "retrieval-v1",
            "shadow_model_version": "retrieval-v2",
            "items": [{"post_id": 100, "score": 0.8, "scores": scores}],
        }
    )
    asyncio.run(recorder.shadow(retrieval))
    report = EventSink(log, world).run()  # the served feed is still in its window
    assert (report.shadow_rows, report.feeds_written, report.log_rows) == (3, 0, 0)
    rows = pq.read_table(world / "live" / "shadow" / f"day={DAY}").to_pylist()
    assert [(r["post_id"], r["position"], r["served_position"]) for r in rows] == [
        (102, 0, 2),
        (555, 1, -1),
        (100, 0, 0),
    ]
    assert [(r["served_model_version"], r["shadow_model_version"]) for r in rows] == [
        ("ranker-v1", "ranker-v2")
    ] * 2 + [("retrieval-v1", "retrieval-v2")]
    assert rows[0]["pred_like"] == 0.25 and rows[0]["latency_ms"] == 12.5
    assert EventSink(log, world).run().shadow_rows == 0  # exactly once
    assert not _logs(world)  # a shadow feed was never shown: no training rows


def test_an_open_feed_is_kept_as_its_key_and_written_from_the_bus(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    """The state holds no served payload (it grew with the feeds in their window: 5 GB for a
    67k-feed backlog); the feed's rows come from re-reading its record on the bus."""
    log, world = _bus(tmp_path)
    sink = EventSink(log, world, SinkConfig(attribution_window_s=60.0))
    log.append([bus_records.served(RID_A, 7, [100, 101], at=1000.0)])
    log.append([bus_records.event(RID_A, "like", 1, 101, 7, 1010.0, "like-a-1")])
    first = sink.run()
    assert first.pending_feeds == 1 and first.retain_below == 0  # the feed's record, seq 0
    entry = sink.state()["pending"][RID_A]
    assert set(entry) == {"seq", "received_at", "user_id", "variant", "posts", "slots"}
    assert entry["posts"] == [100, 101] and entry["slots"] == {"1": {"types": ["like"], "dwell": 0}}
    log.append([bus_records.served(RID_B, 8, [200], at=1070.0)])
    second = sink.run()
    assert second.feeds_written == 1 and second.retain_below == 2  # B's record
    exposures = pq.read_table(world / "live" / "exposures" / f"day={DAY}").to_pylist()
    assert [(e["post_id"], e["like"], e["score"]) for e in exposures] == [
        (100, 0, 1.0),
        (101, 1, 0.5),
    ]


def test_retention_below_an_open_feed_is_an_error_naming_the_seq(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log = EventLog(tmp_path / "bus", segment_bytes=1024)  # a segment per (20-post) feed
    world = tmp_path / "world"
    sink = EventSink(log, world, SinkConfig(attribution_window_s=60.0))
    log.append([bus_records.served(RID_A, 7, list(range(20)), at=1000.0)])
    log.append([bus_records.served(RID_B, 8, list(range(20)), at=1001.0)])
    assert sink.run().retain_below == 0
    assert log.retain(1) == 1  # drops A's served record, which the sink has not written yet
    log.append([bus_records.served("c" * 32, 9, [300], at=1070.0)])
    with pytest.raises(EventLogError, match="served at bus seq 0 is still to be written"):
        sink.run()
    assert _logs(world) == {}  # nothing half-written, the committed state unchanged
    assert sink.state()["next_seq"] == 2


def test_writing_in_chunks_changes_no_row(
    tmp_path: Path, bus_records: BusRecords, monkeypatch: pytest.MonkeyPatch
) -> None:
    def run(root: Path) -> dict[str, list[dict[str, Any]]]:
        log, world = _bus(root)
        for i in range(7):
            rid = f"{i:032x}"
            log.append([bus_records.served(rid, i, [10 * i, 10 * i + 1], at=1000.0 + i)])
            log.append([bus_records.event(rid, "like", i % 2, 10 * i + i % 2, i, 1000.5 + i, rid)])
        EventSink(log, world).run(flush=True)
        return {
            str(f.relative_to(world)): pq.read_table(f, partitioning=None).to_pylist()
            for f in sorted(world.rglob("*.parquet"))
        }

    whole = run(tmp_path / "whole")
    monkeypatch.setattr(event_sink, "CHUNK_FEEDS", 3)
    chunked = run(tmp_path / "chunked")
    assert chunked == whole and sum(len(rows) for rows in whole.values()) == 7 * 2 + 7


def test_a_version_1_state_with_whole_feeds_is_migrated(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    served = bus_records.served(RID_A, 7, [100, 101], at=1000.0)
    log.append([served])
    state = {
        "version": 1,
        "next_seq": 1,
        "inflight": None,
        "watermark": 1000.0,
        "pending": {RID_A: {**served, "seq": 0, "slots": {"0": {"types": ["like"], "dwell": 0}}}},
        "waiting": [],
        "finalized": {},
    }
    (world / "live").mkdir(parents=True)
    (world / "live" / "sink_state.json").write_text(json.dumps(state))
    report = EventSink(log, world).run(flush=True)
    assert report.feeds_written == 1 and _logs(world)[LIVE_ID_BASE]["like"] == 1
    assert EventSink(log, world).state()["version"] == 2


def test_retention_keeps_open_feeds_and_the_recent_bus(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log = EventLog(tmp_path / "bus", segment_bytes=1024)  # a segment per (20-post) feed
    sink = EventSink(log, tmp_path / "world", SinkConfig(attribution_window_s=60.0))
    rids = [f"{i:032x}" for i in range(4)]
    for i, rid in enumerate(rids):
        log.append([bus_records.served(rid, i, list(range(20)), at=1000.0 + i)])
    assert sink.run().retain_below == 0  # every feed is still in its window
    assert sink.retain(0.0, now=5000.0) == (0, 0)  # however old: the sink still needs them
    sink.run(flush=True)
    with pytest.raises(ValueError, match="keep_s"):
        sink.retain(-1.0)
    # Keep what arrived since 1001.5: the embedded log keeps from the segment that may hold
    # it (seq 1's, whose first record is older), and drops seq 0's.
    kept_from, dropped = sink.retain(1.5, now=1003.0)
    assert kept_from == 1 and dropped == 1
    assert [r.seq for r in log.records(kept_from)] == [1, 2, 3]


def _follow(
    sink: EventSink, interval_s: float, until: Any, timeout_s: float = 20.0
) -> list[SinkReport]:
    """Run ``sink.follow`` in a thread until ``until(passes)`` holds; its pass reports."""
    stop = threading.Event()
    passes: list[SinkReport] = []
    job = threading.Thread(
        target=sink.follow, args=(interval_s, stop, lambda report, _: passes.append(report))
    )
    job.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not until(passes) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        job.join(timeout=20)
    assert not job.is_alive()
    return passes


def test_a_following_sink_writes_feeds_as_bus_time_closes_their_windows(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    sink = EventSink(log, world, SinkConfig(attribution_window_s=60.0))
    t0 = time.time()  # recent: no clock record is due within the test
    log.append([bus_records.served(RID_A, 7, [100, 101], at=t0)])
    log.append([bus_records.event(RID_A, "like", 1, 101, 7, t0 + 10, "like-a-1")])
    passes = _follow(sink, 0.02, lambda passes: bool(passes))
    assert passes[0].pending_feeds == 1 and _logs(world) == {}
    log.append([bus_records.served(RID_B, 8, [200], at=t0 + 70)])  # A's window closes
    _follow(sink, 0.02, lambda _: bool(_logs(world)))
    assert [row["like"] for row in _logs(world).values()] == [1]
    assert sink.state()["next_seq"] == 3 and list(sink.state()["pending"]) == [RID_B]
    assert [r.payload["kind"] for r in log.records()] == ["served", "event", "served"]


def test_with_no_traffic_the_following_sink_moves_bus_time_on_with_clock_records(
    tmp_path: Path, bus_records: BusRecords
) -> None:
    log, world = _bus(tmp_path)
    cfg = SinkConfig(attribution_window_s=0.5)
    t0 = time.time()
    log.append([bus_records.served(RID_A, 7, [100, 101], at=t0)])
    log.append([bus_records.event(RID_A, "like", 1, 101, 7, t0 + 0.1, "like-a-1")])
    # No record comes after these: the sink's own clock records close A's window.
    _follow(EventSink(log, world, cfg), 0.1, lambda _: bool(_logs(world)))
    assert [row["like"] for row in _logs(world).values()] == [1]
    kinds = [r.payload["kind"] for r in log.records()]
    assert kinds[:2] == ["served", "event"] and set(kinds[2:]) == {"clock"}
    # The closing is on the bus: a sink reading it from scratch, without a flush, writes the
    # same rows; and with nothing open the follower writes no more clocks.
    again = tmp_path / "again"
    EventSink(log, again, cfg).run()
    assert _logs(again) == _logs(world)
    end = log.end_seq()
    _follow(EventSink(log, world, cfg), 0.05, lambda passes: len(passes) >= 3)
    assert log.end_seq() == end


def test_following_needs_a_positive_interval(tmp_path: Path) -> None:
    log, world = _bus(tmp_path)
    sink = EventSink(log, world, SinkConfig(attribution_window_s=60.0))
    stop = threading.Event()
    with pytest.raises(ValueError, match="interval_s"):
        sink.follow(0.0, stop, lambda *_: None)
