"""The embedded event bus: durability, idempotency, several writers, torn writes, SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from feedrec.events.event_log import EventLog, EventLogError


def _keys(log: EventLog, start: int = 0) -> list[str]:
    return [r.payload["idempotency_key"] for r in log.records(start)]


def test_append_then_read_in_order_with_seqs(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    first = log.append([{"idempotency_key": "a", "x": 1}, {"idempotency_key": "b", "x": 2}])
    second = log.append([{"x": 3}])
    assert first.seqs == (0, 1) and first.written == 2
    assert second.seqs == (2,)
    records = list(log.records())
    assert [r.seq for r in records] == [0, 1, 2]
    assert [r.payload["x"] for r in records] == [1, 2, 3]
    assert [r.seq for r in log.records(2)] == [2]
    assert log.end_seq() == 3


def test_a_key_is_written_once_within_and_across_calls_and_writers(tmp_path: Path) -> None:
    a, b = EventLog(tmp_path), EventLog(tmp_path)  # two processes' writers on one log
    r1 = a.append([{"idempotency_key": "k1"}, {"idempotency_key": "k1"}, {"idempotency_key": "k2"}])
    assert r1.duplicates == (False, True, False) and r1.seqs == (0, 0, 1)
    r2 = b.append([{"idempotency_key": "k2"}, {"idempotency_key": "k3"}])  # b never saw k2
    assert r2.duplicates == (True, False) and r2.seqs == (1, 2)
    r3 = a.append([{"idempotency_key": "k3"}, {"idempotency_key": "k4"}])  # a catches up on k3
    assert r3.duplicates == (True, False) and r3.seqs == (2, 3)
    assert _keys(EventLog(tmp_path)) == ["k1", "k2", "k3", "k4"]


def test_a_torn_tail_is_never_read_and_is_cut_by_the_next_writer(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.append([{"idempotency_key": "ok-1"}])
    (_, segment), *_ = log.segments()
    whole = segment.read_bytes()
    log.append([{"idempotency_key": "torn-0"}])
    torn = segment.read_bytes()[len(whole) :]
    segment.write_bytes(whole + torn[: len(torn) // 2])  # a writer killed mid-record
    assert _keys(EventLog(tmp_path)) == ["ok-1"]
    assert EventLog(tmp_path).append([{"idempotency_key": "ok-2"}]).seqs == (1,)
    assert _keys(EventLog(tmp_path)) == ["ok-1", "ok-2"]
    assert segment.stat().st_size == len(whole) + len(torn) - len("torn-0") + len("ok-2")


def test_segments_rotate_and_retention_bounds_the_log(tmp_path: Path) -> None:
    log = EventLog(tmp_path, segment_bytes=1024)
    for i in range(60):
        log.append([{"idempotency_key": f"key-{i:03d}", "pad": "x" * 40}])
    segments = log.segments()
    assert len(segments) > 3
    assert [int(k[4:]) for k in _keys(log)] == list(range(60))
    assert [r.seq for r in log.records(37)][:1] == [37]
    dropped = log.retain(segments[2][0])
    assert dropped == 2
    assert log.segments()[0][0] == segments[2][0]
    with pytest.raises(EventLogError, match="dropped by retention"):
        list(log.records(0))
    # Keys of dropped segments left the idempotency window; the others are still deduped.
    again = log.append([{"idempotency_key": "key-000"}, {"idempotency_key": "key-059"}])
    assert again.duplicates == (False, True)


def test_damage_in_the_middle_of_the_log_is_an_error_not_silence(tmp_path: Path) -> None:
    log = EventLog(tmp_path, segment_bytes=1024)
    for i in range(40):
        log.append([{"idempotency_key": f"key-{i:03d}", "pad": "x" * 40}])
    (_, first), *_ = log.segments()
    data = bytearray(first.read_bytes())
    data[30] ^= 0xFF  # flip a payload byte of the first record
    first.write_bytes(bytes(data))
    with pytest.raises(EventLogError, match="damaged"):
        list(EventLog(tmp_path).records())
    with pytest.raises(EventLogError, match="damaged"):
        EventLog(tmp_path).append([{"idempotency_key": "after"}])


def test_unencodable_records_write_nothing(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    with pytest.raises(ValueError):
        log.append([{"idempotency_key": "fine"}, {"bad": float("nan")}])
    with pytest.raises(EventLogError, match="over the"):
        log.append([{"big": "x" * (1 << 21)}])
    assert list(log.records()) == []


_WRITER = textwrap.dedent(
    """
    import sys
    from feedrec.events.event_log import EventLog
    log = EventLog(sys.argv[1])
    start, pad = int(sys.argv[2]), "p" * int(sys.argv[3])
    for i in range(start, start + 1_000_000):
        batch = [{"idempotency_key": f"k{i}-{j}", "pad": pad} for j in range(5)]
        log.append(batch)
        print(i, flush=True)  # acknowledged: durable before this line is written
    """
)


def test_sigkill_mid_stream_loses_no_acknowledged_record_and_writes_none_twice(
    tmp_path: Path,
) -> None:
    """A writer process is SIGKILLed at arbitrary moments while appending 5-record batches of
    ~40 KiB. Every batch it acknowledged is in the log exactly once; the next writer re-sends
    from the first batch it holds no ack for (a client retrying with the same keys), which is
    often already durable (killed between fsync and ack), and nothing is written twice.
    (Linux completes a regular-file write before delivering SIGKILL, so a torn record needs a
    power cut; the torn-tail test above writes one by hand.)"""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    root = tmp_path / "log"
    acked: set[int] = set()
    next_batch = 0
    for round_ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), str(next_batch), str(8000)],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.4 + 0.15 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        done = [int(line) for line in out.split()]
        acked.update(done)
        # The client re-sends from the first batch it holds no ack for: maybe already written.
        next_batch = (max(done) + 1) if done else next_batch
    log = EventLog(root)
    log.append([{"idempotency_key": "final"}])  # cuts any torn tail, then appends
    keys = _keys(log)
    assert len(keys) == len(set(keys)), "a record was written twice"
    for i in acked:
        for j in range(5):
            assert f"k{i}-{j}" in set(keys), f"acknowledged record k{i}-{j} lost"
    assert keys[-1] == "final"
    assert len(acked) > 20  # the writer really made progress between kills
