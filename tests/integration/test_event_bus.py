"""The event bus contract on both backends, the embedded log and Redis Streams (a real
``redis-server`` per test, started with the durability settings the bus requires), plus what
only Redis has: a SIGKILLed server, a server that does not fsync, a server gone mid-service.

No Ray here. The Redis cases skip when ``redis-server`` is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import pytest
import redis

from feedrec.events.event_bus import EventBus, open_event_bus
from feedrec.events.event_log import EventLog, EventLogError
from feedrec.events.event_sink import EventSink, SinkConfig
from feedrec.events.feed_event import EventBatch, feed_event
from feedrec.events.feed_recorder import FeedRecorder
from feedrec.events.redis_event_log import EventBusUnavailable, RedisEventLog

if TYPE_CHECKING:
    from conftest import BusRecords, RedisServer  # the shared fixtures' types (tests/conftest.py)


@dataclass
class Backend:
    """One bus, by location (what writer processes are given) and a way to open a writer."""

    name: str
    location: str
    open: Callable[[], EventBus]


@pytest.fixture(params=["embedded", "redis"])
def bus(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "embedded":
        root = tmp_path / "log"
        # Small segments, so that retention has whole segments to drop.
        return Backend("embedded", str(root), lambda: EventLog(root, segment_bytes=1024))
    server: RedisServer = request.getfixturevalue("redis_server")
    return Backend("redis", server.url(), lambda: open_event_bus(server.url()))


def _keys(log: EventBus, start: int = 0) -> list[str]:
    return [r.payload["idempotency_key"] for r in log.records(start)]


# -- the contract, on both backends --------------------------------------------------------


def test_append_then_read_in_order_with_seqs(bus: Backend) -> None:
    log = bus.open()
    assert log.end_seq() == 0 and list(log.records()) == []
    first = log.append([{"idempotency_key": "a", "x": 1}, {"idempotency_key": "b", "x": 2}])
    second = log.append([{"x": 3}])
    assert first.seqs == (0, 1) and first.written == 2
    assert second.seqs == (2,)
    records = list(log.records())
    assert [r.seq for r in records] == [0, 1, 2]
    assert [r.payload["x"] for r in records] == [1, 2, 3]
    assert [r.seq for r in log.records(2)] == [2]
    assert list(log.records(3)) == []
    assert log.end_seq() == 3
    assert log.append([]).seqs == ()


def test_a_key_is_written_once_within_and_across_calls_and_writers(bus: Backend) -> None:
    a, b = bus.open(), bus.open()  # two processes' writers on one bus
    r1 = a.append([{"idempotency_key": "k1"}, {"idempotency_key": "k1"}, {"idempotency_key": "k2"}])
    assert r1.duplicates == (False, True, False) and r1.seqs == (0, 0, 1)
    r2 = b.append([{"idempotency_key": "k2"}, {"idempotency_key": "k3"}])  # b never saw k2
    assert r2.duplicates == (True, False) and r2.seqs == (1, 2)
    r3 = a.append([{"idempotency_key": "k3"}, {"idempotency_key": "k4"}])  # a catches up on k3
    assert r3.duplicates == (True, False) and r3.seqs == (2, 3)
    assert _keys(bus.open()) == ["k1", "k2", "k3", "k4"]


def test_retention_drops_old_records_and_their_keys(bus: Backend) -> None:
    log = bus.open()
    for i in range(60):
        log.append([{"idempotency_key": f"key-{i:03d}", "pad": "x" * 40}])
    assert log.retain(30) > 0
    assert [r.seq for r in log.records(30)] == list(range(30, 60))
    assert log.end_seq() == 60
    with pytest.raises(EventLogError, match="dropped by retention"):
        list(log.records(0))
    # Dropped records' keys left the idempotency window; kept ones are still deduped, for
    # this writer and for one opened after the retention.
    again = log.append([{"idempotency_key": "key-000"}, {"idempotency_key": "key-030"}])
    assert again.duplicates == (False, True) and again.seqs == (60, 30)
    other = bus.open().append([{"idempotency_key": "key-001"}, {"idempotency_key": "key-059"}])
    assert other.duplicates == (False, True) and other.seqs == (61, 59)
    assert log.retain(0) == 0


def test_seq_at_finds_where_the_records_since_a_time_begin(bus: Backend) -> None:
    log = bus.open()
    for i in range(60):  # received one a second from t = 1000; ~12 records a 1 KiB segment
        log.append(
            [{"idempotency_key": f"key-{i:03d}", "received_at": 1000.0 + i, "pad": "x" * 20}]
        )
    start = log.seq_at(1030.0)
    since = [r.payload["received_at"] for r in log.records(start)]
    assert [t for t in since if t >= 1030.0] == [1000.0 + i for i in range(30, 60)]
    # At most the rest of a segment earlier (the embedded log reads one record a segment).
    assert 30 - 15 <= start <= 30
    if bus.name == "redis":
        assert start == 30  # a binary search over single records
    assert log.seq_at(0.0) == 0
    assert log.seq_at(1e12) <= 60 and list(log.records(log.seq_at(1e12))) is not None
    # A record without a time counts as new: nothing after it is skipped.
    log.append([{"idempotency_key": "no-time"}])
    log.append([{"idempotency_key": "late", "received_at": 2000.0}])
    assert log.seq_at(1999.0) <= 60
    # After retention, the answer is a seq that can still be read.
    log.retain(30)
    first = log.seq_at(0.0)
    assert 0 < first <= 30 and next(iter(log.records(first))).seq == first


def test_a_snapshot_is_kept_by_name_and_the_newer_seq_wins(bus: Backend) -> None:
    log, other = bus.open(), bus.open()
    assert log.snapshot_seq("signals") is None and log.load_snapshot("signals") is None
    data = bytes(range(256)) * 10  # any bytes, NUL and non-UTF-8 included
    log.save_snapshot("signals", 100, data)
    assert other.snapshot_seq("signals") == 100
    assert other.load_snapshot("signals") == (100, data)
    other.save_snapshot("signals", 250, b"newer")
    log.save_snapshot("signals", 180, b"older, saved later")  # a slower replica's
    assert log.load_snapshot("signals") == (250, b"newer")
    assert log.snapshot_seq("other") is None  # names are separate
    log.append([{"x": 1}])
    assert log.retain(1) >= 0 and log.load_snapshot("signals") == (250, b"newer")
    with pytest.raises(ValueError, match="snapshot name"):
        log.save_snapshot("../escape", 1, b"")


def test_unencodable_records_write_nothing(bus: Backend) -> None:
    log = bus.open()
    with pytest.raises(ValueError):
        log.append([{"idempotency_key": "fine"}, {"bad": float("nan")}])
    with pytest.raises(EventLogError, match="over the"):
        log.append([{"idempotency_key": "fine"}, {"big": "x" * (1 << 21)}])
    assert list(log.records()) == [] and log.end_seq() == 0
    assert log.append([{"idempotency_key": "fine"}]).duplicates == (False,)


_WRITER = textwrap.dedent(
    """
    import sys
    from feedrec.events.event_bus import open_event_bus
    from feedrec.events.event_log import EventLogError
    try:
        log = open_event_bus(sys.argv[1])
        start, pad = int(sys.argv[2]), "p" * int(sys.argv[3])
        for i in range(start, start + 1_000_000):
            batch = [{"idempotency_key": f"k{i}-{j}", "pad": pad} for j in range(5)]
            log.append(batch)
            print(i, flush=True)  # acknowledged: durable before this line is written
    except EventLogError as e:  # the bus went away: what a client sees as a 503
        print(f"error {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    """
)


def _writer(tmp_path: Path, location: str, start: int) -> subprocess.Popen[str]:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), location, str(start), str(8000)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _acked(out: str) -> list[int]:
    return [int(line) for line in out.split()]


def _check_exactly_once(log: EventBus, acked: set[int]) -> None:
    log.append([{"idempotency_key": "final"}])
    keys = _keys(log)
    assert len(keys) == len(set(keys)), "a record was written twice"
    missing = {f"k{i}-{j}" for i in acked for j in range(5)} - set(keys)
    assert not missing, f"acknowledged records lost: {sorted(missing)[:5]}"
    assert keys[-1] == "final"
    assert [r.seq for r in log.records()] == list(range(len(keys)))


def test_sigkill_a_writer_mid_stream_loses_no_acknowledged_record_and_writes_none_twice(
    bus: Backend, tmp_path: Path
) -> None:
    """A writer process is SIGKILLed at arbitrary moments while appending 5-record batches of
    ~40 KiB. Every batch it acknowledged is on the bus exactly once; the next writer re-sends
    from the first batch it holds no ack for (a client retrying with the same keys), which is
    often already durable (killed between the write and the ack), and nothing is written
    twice."""
    acked: set[int] = set()
    next_batch = 0
    for round_ in range(6):
        proc = _writer(tmp_path, bus.location, next_batch)
        time.sleep(0.4 + 0.15 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        done = _acked(out)
        acked.update(done)
        next_batch = (max(done) + 1) if done else next_batch
    _check_exactly_once(bus.open(), acked)
    assert len(acked) > 20  # the writer really made progress between kills


# -- Redis only ----------------------------------------------------------------------------


def test_sigkill_the_redis_server_mid_stream_loses_no_acknowledged_record(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The server itself is SIGKILLed while a writer appends, then restarted on the same dir
    and port (it replays its append-only file). Every acknowledged batch is there exactly once,
    and the writer's re-sent batches after each restart are deduplicated by the key index that
    survived the crash. (A process kill keeps the page cache: that ``appendfsync always`` also
    covers a power cut is Redis's guarantee, checked at open, not something a test can cut.)"""
    acked: set[int] = set()
    next_batch = 0
    for round_ in range(5):
        proc = _writer(tmp_path, redis_server.url(), next_batch)
        time.sleep(0.5 + 0.2 * round_)
        redis_server.kill()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 3 and "event bus" in err, err  # a 503, not a hang
        done = _acked(out)
        acked.update(done)
        next_batch = (max(done) + 1) if done else next_batch
        redis_server.start()
    _check_exactly_once(open_event_bus(redis_server.url()), acked)
    assert len(acked) > 20


def test_a_server_gone_mid_service_is_an_event_log_error_and_its_return_is_picked_up(
    redis_server: RedisServer,
) -> None:
    log = open_event_bus(redis_server.url())
    log.append([{"idempotency_key": "before"}])
    redis_server.kill()
    for call in (
        lambda: log.append([{"idempotency_key": "during"}]),
        lambda: list(log.records()),
        log.end_seq,
        lambda: log.retain(1),
    ):
        with pytest.raises(EventBusUnavailable, match=str(redis_server.port)):
            call()
    redis_server.start()  # the same writer reconnects: no new Ingress needed
    assert log.append([{"idempotency_key": "after"}]).seqs == (1,)
    assert _keys(log) == ["before", "after"]


def test_open_refuses_a_server_that_would_ack_before_fsync(redis_server: RedisServer) -> None:
    admin = redis.Redis(port=redis_server.port)
    admin.config_set("appendfsync", "everysec")
    with pytest.raises(EventLogError, match=r"appendfsync everysec.*--appendfsync always"):
        open_event_bus(redis_server.url())
    assert open_event_bus(redis_server.url(), require_fsync=False).end_seq() == 0
    admin.config_set("appendfsync", "always")
    admin.config_set("appendonly", "no")
    with pytest.raises(EventLogError, match="appendonly no"):
        open_event_bus(redis_server.url())
    admin.close()


def test_streams_on_one_server_are_separate_buses(redis_server: RedisServer) -> None:
    a = open_event_bus(redis_server.url("bus-a"))
    b = open_event_bus(redis_server.url("bus-b"))
    a.append([{"idempotency_key": "k"}])
    assert b.append([{"idempotency_key": "k"}]).duplicates == (False,)
    assert b.end_seq() == 1 and _keys(a) == ["k"]


def test_records_page_through_long_streams_and_reject_foreign_entries(
    redis_server: RedisServer,
) -> None:
    log = open_event_bus(redis_server.url())
    for chunk in range(3):  # 1200 records: more than two XRANGE pages
        log.append([{"n": chunk * 400 + i} for i in range(400)])
    assert [r.payload["n"] for r in log.records()] == list(range(1200))
    assert [r.seq for r in log.records(1100)] == list(range(1100, 1200))
    admin = redis.Redis(port=redis_server.port)
    admin.xadd("events", {"payload": "{}"})  # someone else's XADD with an automatic id
    with pytest.raises(EventLogError, match="not written by RedisEventLog"):
        list(log.records(1100))
    admin.close()


RID_A, RID_B, RID_C = "a" * 32, "b" * 32, "c" * 32


def _world_files(world: Path) -> dict[str, Any]:
    """Every file the sink wrote, by relative path: Parquet rows, or JSONL lines."""
    out: dict[str, Any] = {}
    for path in sorted(world.rglob("*")):
        rel = str(path.relative_to(world))
        if path.suffix == ".parquet":
            out[rel] = pq.read_table(path, partitioning=None).to_pylist()
        elif path.suffix == ".jsonl":
            out[rel] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


def test_the_sink_writes_the_same_logs_from_redis_as_from_the_embedded_log(
    redis_server: RedisServer, tmp_path: Path, bus_records: BusRecords
) -> None:
    batches = [
        [bus_records.event(RID_A, "like", 1, 101, 7, 999.0, "early")],  # before its feed's record
        [bus_records.served(RID_A, 7, [100, 101, 102], at=1000.0)],
        [
            bus_records.event(RID_A, "impression", 0, 100, 7, 1001.0, "imp-a-0"),
            bus_records.event(RID_A, "impression", 1, 101, 7, 1001.0, "imp-a-1"),
            bus_records.event(RID_A, "dwell", 0, 100, 7, 1002.0, "dwell-a-0", dwell_s=6.5),
        ],
        [bus_records.served(RID_B, 8, [200, 201], at=1003.0)],
        [
            bus_records.event(RID_B, "impression", 0, 200, 8, 1004.0, "imp-b-0"),
            bus_records.event(RID_B, "hide", 0, 200, 8, 1004.5, "hide-b-0"),
            bus_records.event(RID_B, "like", 0, 555, 8, 1005.0, "wrong-post"),
            bus_records.event(RID_A, "like", 0, 100, 7, 1005.0, "like-a-0"),
            bus_records.event(RID_A, "like", 0, 100, 7, 1005.0, "like-a-0"),  # a retry: deduped
        ],
        [bus_records.event(RID_C, "like", 0, 1, 2, 1006.0, "unknown")],
    ]
    buses: dict[str, EventBus] = {
        "embedded": EventLog(tmp_path / "log"),
        "redis": open_event_bus(redis_server.url()),
    }
    assert isinstance(buses["redis"], RedisEventLog)
    worlds = {}
    for name, log in buses.items():
        for batch in batches:
            log.append(batch)
        world = tmp_path / f"world-{name}"
        sink = EventSink(log, world, SinkConfig(max_records=3))  # several ranges
        first = sink.run()
        log.append([bus_records.served(RID_C, 9, [300], at=1007.0)])
        second = EventSink(log, world, SinkConfig(max_records=3)).run(flush=True)
        assert (first.records + second.records, second.next_seq) == (12, 12)
        worlds[name] = _world_files(world)
    assert any(k.startswith("logs/") for k in worlds["embedded"])
    assert any(k.startswith("live/rejected/") for k in worlds["embedded"])
    assert worlds["redis"] == worlds["embedded"]


def test_the_feed_recorder_writes_to_the_bus_its_location_names(
    redis_server: RedisServer,
) -> None:
    recorder = FeedRecorder(redis_server.url(), serving_day=30, snapshot="day30")
    assert isinstance(recorder.log, RedisEventLog)
    event = feed_event(
        type="like",
        request_id=RID_A,
        position=0,
        post_id=1,
        user_id=2,
        variant="control",
        idempotency_key="key-like-1",
    )
    batch = EventBatch(events=[event])
    ack, duplicates = asyncio.run(recorder.events(batch))
    assert (ack.accepted, ack.duplicates, duplicates) == (1, 0, (False,))
    ack, duplicates = asyncio.run(recorder.events(batch))  # the client's retry
    assert (ack.accepted, ack.duplicates, duplicates) == (0, 1, (True,))
    assert [r.payload["idempotency_key"] for r in recorder.log.records()] == ["event:key-like-1"]


def test_a_following_sink_rides_out_a_redis_crash(
    redis_server: RedisServer, tmp_path: Path, bus_records: BusRecords
) -> None:
    """``feedrec events sink --follow-s``: a pass that finds the server gone is reported and
    retried; once the server is back (same AOF), the feeds are written exactly once."""
    log = open_event_bus(redis_server.url())
    world = tmp_path / "world"
    sink = EventSink(log, world, SinkConfig(attribution_window_s=60.0))
    t0 = time.time()  # recent: the sink's clock records do not close A's window in the test
    log.append([bus_records.served("a" * 32, 7, [100, 101], at=t0)])
    stop = threading.Event()
    passes: list[int] = []
    outages: list[str] = []
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            sink.follow(
                0.05,
                stop,
                lambda report, _: passes.append(report.records),
                on_outage=lambda e: outages.append(str(e)),
            )
        except BaseException as e:  # the assertion below shows it
            errors.append(e)

    job = threading.Thread(target=follow)
    job.start()
    try:
        deadline = time.monotonic() + 60
        while not passes and time.monotonic() < deadline:
            time.sleep(0.01)
        redis_server.kill()
        while not outages and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outages and str(redis_server.port) in outages[0]
        redis_server.start()
        log.append([bus_records.served("b" * 32, 8, [200], at=t0 + 70)])  # A's window closes
        while "b" * 32 not in sink.state()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        job.join(timeout=30)
    assert not job.is_alive() and errors == []
    exposures = pq.read_table(world / "live" / "exposures").to_pylist()
    assert sorted(e["post_id"] for e in exposures) == [100, 101]  # A once; B still open
