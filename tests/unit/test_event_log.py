"""The embedded event bus's own details: torn tails, segments, damage in the middle.

The contract both backends share (order, idempotency across writers, retention, unencodable
records, a SIGKILLed writer) is tested on both in tests/integration/test_event_bus.py."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from feedrec.events import event_log
from feedrec.events.event_log import EventLog, EventLogError


def _keys(log: EventLog, start: int = 0) -> list[str]:
    return [r.payload["idempotency_key"] for r in log.records(start)]


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
    # A new writer takes a full segment's keys from its key file, written when the segment
    # was whole, and appends; readers (the sink, the real-time signals) still refuse it.
    assert EventLog(tmp_path).append([{"idempotency_key": "after"}]).duplicates == (False,)
    first.with_suffix(".keys").unlink()  # without it, the writer reads the records
    with pytest.raises(EventLogError, match="damaged"):
        EventLog(tmp_path).append([{"idempotency_key": "after-2"}])


def test_a_writer_catches_up_from_its_own_offset_and_cuts_a_torn_tail_there(
    tmp_path: Path,
) -> None:
    """Another writer's records and torn tail, after the point this writer had read to."""
    a, b = EventLog(tmp_path), EventLog(tmp_path)
    a.append([{"idempotency_key": "a-1", "pad": "x" * 100}])
    b.append([{"idempotency_key": "b-1"}])
    (_, segment), *_ = a.segments()
    good = segment.read_bytes()
    b.append([{"idempotency_key": "b-torn"}])
    segment.write_bytes(segment.read_bytes()[: len(good) + 10])  # b killed mid-record
    result = a.append([{"idempotency_key": "b-1"}, {"idempotency_key": "a-2"}])
    assert result.seqs == (1, 2) and result.duplicates == (True, False)
    assert _keys(EventLog(tmp_path)) == ["a-1", "b-1", "a-2"]
    assert segment.read_bytes().startswith(good) and EventLog(tmp_path).end_seq() == 3


def test_a_polling_reader_reads_only_new_bytes_and_sees_every_record(tmp_path: Path) -> None:
    writer, reader = EventLog(tmp_path, segment_bytes=2048), EventLog(tmp_path)
    seen: list[int] = []
    next_seq = 0
    for i in range(80):
        writer.append([{"idempotency_key": f"key-{i:03d}", "pad": "y" * 30}])
        for record in reader.records(next_seq):
            seen.append(record.seq)
            next_seq = record.seq + 1
    assert seen == list(range(80)) and len(writer.segments()) > 1
    assert reader._cursor is not None and reader._cursor[0] == 80
    # A read from elsewhere (not the cursor) scans from the segment's start, still correct.
    assert [r.seq for r in reader.records(5)][:3] == [5, 6, 7]


def test_a_catching_up_writer_finds_keys_first_or_not_and_never_a_nested_one(
    tmp_path: Path,
) -> None:
    """Records written here put their key first (read without parsing the body); a record
    whose key comes later (another producer's) is parsed in full."""
    body = json.dumps(
        {"x": {"idempotency_key": "nested"}, "idempotency_key": "late"}, separators=(",", ":")
    ).encode()
    header = event_log._HEADER.pack(
        event_log.MAGIC, len(body), zlib.crc32(struct.pack("<Q", 0) + body), 0
    )
    (tmp_path / event_log._segment_name(0)).write_bytes(header + body)
    first = EventLog(tmp_path).append(
        [
            {"idempotency_key": "late"},
            {"idempotency_key": "nested"},
            {"x": {"idempotency_key": "inner"}, "idempotency_key": "written"},
        ]
    )
    assert first.duplicates == (True, False, False) and first.seqs == (0, 1, 2)
    again = EventLog(tmp_path).append(
        [{"idempotency_key": "written"}, {"idempotency_key": "inner"}]
    )
    assert again.duplicates == (True, False) and again.seqs == (2, 3)
    assert next(r.payload for r in EventLog(tmp_path).records(2)) == {
        "idempotency_key": "written",
        "x": {"idempotency_key": "inner"},
    }


def test_a_saved_snapshot_replaces_the_older_files_and_leaves_no_tmp(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "bus")
    log.append([{"x": 1}])
    for seq in (10, 20, 30):
        log.save_snapshot("signals", seq, str(seq).encode())
    log.save_snapshot("other", 5, b"o")
    files = sorted(p.name for p in (tmp_path / "bus" / "snapshots").iterdir())
    assert files == ["other-000000000005.bin", "signals-000000000030.bin"]
    assert log.load_snapshot("signals") == (30, b"30")
    assert [r.payload for r in log.records()] == [{"x": 1}]  # segments are untouched


def _fill(root: Path, n: int) -> EventLog:
    log = EventLog(root, segment_bytes=1024)
    for i in range(n):
        log.append([{"idempotency_key": f"key-{i:03d}", "pad": "x" * 40}])
    return log


def _count_parsed_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    parsed = [0]
    real = event_log._record_key

    def counting(body: bytes) -> str | None:
        parsed[0] += 1
        return real(body)

    monkeypatch.setattr(event_log, "_record_key", counting)
    return parsed


def test_full_segments_get_key_files_that_a_new_writer_reads_instead_of_the_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = _fill(tmp_path, 60)
    segments = log.segments()
    *full, (_, active) = segments
    assert len(full) >= 3
    for (first, path), (following, _) in zip(full, segments[1:], strict=True):
        last_seq, keys = event_log._read_keys(path, path.stat().st_size) or (None, None)
        assert last_seq == following - 1
        assert keys == {f"key-{s:03d}": s for s in range(first, following)}
    assert not active.with_suffix(".keys").exists()  # still being written
    parsed = _count_parsed_keys(monkeypatch)
    writer = EventLog(tmp_path, segment_bytes=1024)
    result = writer.append([{"idempotency_key": "key-000"}, {"idempotency_key": "key-060"}])
    assert result.duplicates == (True, False)
    assert result.seqs == (0, 60)
    assert parsed[0] == 60 - segments[-1][0]  # only the active segment's records
    assert [int(k[4:]) for k in _keys(writer)] == list(range(61))


@pytest.mark.parametrize("breakage", ["missing", "damaged", "other bytes"])
def test_an_unusable_key_file_is_ignored_scanned_past_and_written_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, breakage: str
) -> None:
    log = _fill(tmp_path, 60)
    (first, path), (following, _), *_ = log.segments()
    key_file = path.with_suffix(".keys")
    if breakage == "missing":  # the writer that started the next segment died first
        key_file.unlink()
    elif breakage == "damaged":
        data = bytearray(key_file.read_bytes())
        data[-3] ^= 0xFF
        key_file.write_bytes(bytes(data))
    else:  # written for another length of the segment
        data = bytearray(key_file.read_bytes())
        struct.pack_into("<Q", data, 12, path.stat().st_size + 1)
        key_file.write_bytes(bytes(data))
    parsed = _count_parsed_keys(monkeypatch)
    writer = EventLog(tmp_path, segment_bytes=1024)
    assert writer.append([{"idempotency_key": f"key-{first:03d}"}]).duplicates == (True,)
    assert parsed[0] == (following - first) + (60 - log.segments()[-1][0])
    assert event_log._read_keys(path, path.stat().st_size) == (
        following - 1,
        {f"key-{s:03d}": s for s in range(first, following)},
    )


def test_retention_deletes_key_files_with_their_segments(tmp_path: Path) -> None:
    log = _fill(tmp_path, 60)
    segments = log.segments()
    assert log.retain(segments[2][0]) == 2
    assert sorted(p.name for p in tmp_path.glob("*.keys")) == [
        path.with_suffix(".keys").name for _, path in log.segments()[:-1]
    ]
