"""The embedded event bus: an append-only, crash-safe local log of JSON records.

Layout of ``root``::

    LOCK                          writers serialise on flock(LOCK)
    segment-000000000000.log      records with seq 0 ..
    segment-000000052113.log      records from seq 52113 (named after its first record)
    segment-000000000000.keys     the idempotency keys of a full (sealed) segment
    snapshots/NAME-000000060000.bin   a reader's state after the records below seq 60000

A record on disk is ``MAGIC | length u32 | crc32 u32 | seq u64 | payload`` (little endian), the
payload a compact JSON object. ``append`` returns only after ``fsync``: an acknowledged record
survives a crash of the process (and, with ``fsync``, of the machine). A writer killed in the
middle of a write leaves a torn record at the end of the active segment; readers stop before it
(short or bad CRC) and the next writer truncates it under the lock before appending, so a torn
record was never acknowledged and is never read.

Idempotency: a record may carry a key (``KEY_FIELD``). ``append`` skips a record whose key is
already in the log (or earlier in the same call) and reports it as a duplicate, so a client that
retries after a lost acknowledgement does not write an event twice. Every writer keeps the key
index of the retained segments in memory and catches up with other writers' records (other
processes, e.g. other Serve replicas) under the lock before it checks; :meth:`EventLog.retain`
drops whole segments the sink has consumed, which bounds both the disk and the index. When a
segment is full, the writer that starts the next one stores the full one's keys beside it
(``.keys``: a checksummed JSON object), so a new writer (a replica starting) reads those
instead of scanning every record of the retained log; a missing or damaged key file, or one
written for other bytes, is ignored and the segment is scanned (and its key file written).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"\xfe\xed"
_HEADER = struct.Struct("<2sIIQ")  # magic, payload length, crc32(seq bytes + payload), seq
#: The payload field holding a record's idempotency key (records without it are never deduped).
KEY_FIELD = "idempotency_key"
#: Largest payload accepted: a record is one event or one served feed, far below this.
MAX_PAYLOAD = 1 << 20
SEGMENT_BYTES = 64 << 20
#: What a snapshot may be called (it becomes part of a file name or a Redis key).
SNAPSHOT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def check_snapshot_name(name: str) -> str:
    if not SNAPSHOT_NAME.match(name):
        raise ValueError(f"snapshot name {name!r} must match {SNAPSHOT_NAME.pattern}")
    return name


class EventLogError(RuntimeError):
    """The log cannot be written or read as asked (bad record, corrupt middle segment)."""


@dataclass(frozen=True)
class LogRecord:
    """One record: its sequence number (0, 1, ... over the log's life) and its JSON payload."""

    seq: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class AppendResult:
    """Per record given to :meth:`EventLog.append`: its seq (the earlier one for a duplicate)
    and whether it was a duplicate that was not written again."""

    seqs: tuple[int, ...]
    duplicates: tuple[bool, ...]

    @property
    def written(self) -> int:
        return self.duplicates.count(False)


def _segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.log"


def _segment_first(path: Path) -> int:
    """The first seq of the segment at ``path`` (its name); ValueError if not a segment's."""
    return int(path.stem.split("-", 1)[1])


#: How an encoded record starts when it has a key: :func:`_encode` writes the key first, so
#: that a writer catching up reads the keys of other writers' records without parsing them.
_KEY_PREFIX = b'{"' + KEY_FIELD.encode() + b'":'
_DECODER = json.JSONDecoder()
#: A key file: magic, crc32 of the body, body length, the segment's bytes and its last seq
#: when the keys were taken, then the body: the JSON object key -> seq.
_KEYS_MAGIC = b"FRK1"
_KEYS_HEADER = struct.Struct("<4sIIQq")


def _encode(seq: int, payload: Mapping[str, Any]) -> bytes:
    if KEY_FIELD in payload:
        payload = {KEY_FIELD: payload[KEY_FIELD], **payload}
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_PAYLOAD:
        raise EventLogError(f"record of {len(body)} bytes is over the {MAX_PAYLOAD}-byte limit")
    seq_bytes = struct.pack("<Q", seq)
    return _HEADER.pack(MAGIC, len(body), zlib.crc32(seq_bytes + body), seq) + body


def _scan_raw(data: bytes, start: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """Complete, valid records of a segment's bytes from offset ``start``: (end offset, seq,
    JSON body). Stops at the first short or damaged record (a torn tail, or bytes being
    written)."""
    pos = start
    while pos + _HEADER.size <= len(data):
        magic, length, crc, seq = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + length
        if magic != MAGIC or length > MAX_PAYLOAD or end > len(data):
            return
        body = data[pos + _HEADER.size : end]
        if zlib.crc32(struct.pack("<Q", seq) + body) != crc:
            return
        yield end, seq, body
        pos = end


def _scan(data: bytes, start: int = 0) -> Iterator[tuple[int, LogRecord]]:
    """:func:`_scan_raw` with the bodies parsed: (end offset, record)."""
    for end, seq, body in _scan_raw(data, start):
        yield end, LogRecord(seq, json.loads(body))


def _keys_path(segment: Path) -> Path:
    return segment.with_suffix(".keys")


def _encode_keys(segment_bytes: int, last_seq: int, keys: Mapping[str, int]) -> bytes:
    body = json.dumps(keys, separators=(",", ":")).encode()
    return (
        _KEYS_HEADER.pack(_KEYS_MAGIC, zlib.crc32(body), len(body), segment_bytes, last_seq) + body
    )


def _read_keys(segment: Path, segment_bytes: int) -> tuple[int, dict[str, int]] | None:
    """(last seq, key -> seq) of ``segment`` from its key file; None if there is none, or it
    is damaged, or it was written for a segment of other than ``segment_bytes`` bytes."""
    try:
        data = _keys_path(segment).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) < _KEYS_HEADER.size:
        return None
    magic, crc, length, size, last_seq = _KEYS_HEADER.unpack_from(data)
    body = data[_KEYS_HEADER.size :]
    if magic != _KEYS_MAGIC or length != len(body) or size != segment_bytes:
        return None
    if zlib.crc32(body) != crc:
        return None
    try:
        keys = json.loads(body)
    except ValueError:
        return None
    if not isinstance(keys, dict):
        return None
    return last_seq, keys


def record_received_at(body: bytes | str) -> float | None:
    """A record's ``received_at`` (unix s), None if it has none: every served feed, shadow
    feed and client event carries it."""
    value = json.loads(body).get("received_at")
    return float(value) if isinstance(value, int | float) else None


def _record_key(body: bytes) -> str | None:
    """The record's ``KEY_FIELD`` (None: it has none) without parsing the whole body when the
    key comes first (every record this module writes); a full parse otherwise."""
    if body.startswith(_KEY_PREFIX):
        key, _ = _DECODER.raw_decode(body[len(_KEY_PREFIX) :].decode())
    elif KEY_FIELD.encode() in body:
        key = json.loads(body).get(KEY_FIELD)
    else:
        return None
    return key if isinstance(key, str) else None


class EventLog:
    """An append-only log of JSON records under ``root`` (created if missing).

    Safe for several writer processes on one host (flock) and for readers that never lock.
    """

    def __init__(self, root: Path, *, segment_bytes: int = SEGMENT_BYTES, fsync: bool = True):
        if segment_bytes < 1024:
            raise ValueError(f"segment_bytes must be >= 1024, got {segment_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._keys: dict[str, int] = {}
        self._segment: Path | None = None  # the last segment this writer has read to _offset
        self._offset = 0
        self._next_seq = 0
        self._segments_seen: set[str] = set()
        # Where the last read stopped: (next seq, segment name, byte offset, last seq read), so
        # a reader that polls for new records (records(next seq)) reads only what is new.
        self._cursor: tuple[int, str, int, int] | None = None

    # -- reading -----------------------------------------------------------------------------

    def segments(self) -> list[tuple[int, Path]]:
        """(first seq, path) of every segment, oldest first."""
        out = []
        for path in self.root.glob("segment-*.log"):
            try:
                out.append((_segment_first(path), path))
            except ValueError:
                continue  # not ours (e.g. an editor's backup file)
        return sorted(out)

    def records(self, start_seq: int = 0) -> Iterator[LogRecord]:
        """Every complete record with ``seq >= start_seq``, in order (no lock: what is fully
        written now). Raises EventLogError if an older segment is damaged in the middle, and
        if ``start_seq`` was already dropped by :meth:`retain`."""
        segments = self.segments()
        if segments and start_seq < segments[0][0]:
            raise EventLogError(
                f"records before seq {segments[0][0]} were dropped by retention; "
                f"asked for seq {start_seq}"
            )
        for i, (first, path) in enumerate(segments):
            following = segments[i + 1][0] if i + 1 < len(segments) else None
            if following is not None and following <= start_seq:
                continue
            base, last = 0, first - 1
            cursor = self._cursor
            if cursor is not None and cursor[0] == start_seq and cursor[1] == path.name:
                base, last = cursor[2], cursor[3]  # a follower's next read: only the new bytes
            with open(path, "rb") as f:
                f.seek(base)
                data = f.read()
            end = 0
            for record_end, seq, body in _scan_raw(data):
                end, last = record_end, seq
                if seq >= start_seq:  # parse only what is asked for (a follower starts late)
                    self._cursor = (seq + 1, path.name, base + record_end, seq)
                    yield LogRecord(seq, json.loads(body))
            if following is not None and (last != following - 1 or end != len(data)):
                raise EventLogError(
                    f"{path.name} is damaged at byte {end} (records end at seq {last}, the "
                    f"next segment starts at {following})"
                )

    def seq_at(self, unix_s: float) -> int:
        """A seq from which every record received (``received_at``) at or after ``unix_s``
        is read: the first seq of the newest segment whose first record is older, so earlier
        records may come too. Reads one record per segment."""
        segments = self.segments()
        start = segments[0][0] if segments else 0
        for first, path in segments[1:]:
            with open(path, "rb") as f:
                head = f.read(_HEADER.size + MAX_PAYLOAD)
            record = next(_scan_raw(head), None)
            received = record_received_at(record[2]) if record is not None else None
            if received is None or received > unix_s:
                break  # records from here on may be as new as asked for
            start = first
        return start

    def end_seq(self) -> int:
        """The seq the next appended record gets (records fully written so far)."""
        last = -1
        segments = self.segments()
        if segments:
            first, path = segments[-1]
            last = first - 1
            for _, seq, _ in _scan_raw(path.read_bytes()):
                last = seq
        return last + 1

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / "LOCK", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _catch_up(self) -> None:
        """Under the lock: read what other writers appended since this one last looked, index
        their keys, and cut a torn tail off the active segment."""
        segments = self.segments()
        names = {path.name for _, path in segments}
        if self._segments_seen - names:  # retention dropped segments: rebuild the key index
            self._keys.clear()
            self._segment, self._offset = None, 0
        self._segments_seen = names
        for i, (first, path) in enumerate(segments):
            if self._segment is not None and path.name < self._segment.name:
                continue
            sealed = i + 1 < len(segments)  # a later segment exists: nobody appends here
            # Only the bytes after this writer's offset: reading the whole active segment
            # (up to segment_bytes) on every append made each append cost O(segment), which
            # was most of the Ingress's CPU once the log had grown to tens of MB.
            start = self._offset if self._segment == path else 0
            if sealed and start == 0:
                size = path.stat().st_size
                stored = _read_keys(path, size)
                if stored is not None:  # a new writer: the keys without reading the records
                    self._next_seq = stored[0] + 1
                    self._keys.update(stored[1])
                    self._segment, self._offset = path, size
                    continue
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            end = start
            for record_end, seq, body in _scan_raw(data):
                end = start + record_end
                key = _record_key(body)
                if key is not None:
                    self._keys[key] = seq
                self._next_seq = seq + 1
            if end != start + len(data):
                if sealed:
                    raise EventLogError(f"{path.name} is damaged at byte {end}")
                # A writer died mid-record: it was never acknowledged. Cut it off.
                with open(path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())
            self._segment, self._offset = path, end
            # No usable key file: store one, so the next writer to start does not scan this
            # segment again. From 0, the file was just found unusable; a writer that read the
            # segment while it was active finds the one its roller wrote (whole: renamed into
            # place), which a new writer checks in full when it reads it.
            if sealed and (start == 0 or not _keys_path(path).exists()):
                self._store_keys(first, path, end, self._next_seq - 1)
        if self._segment is None:  # empty log, or every record dropped by retention
            self._next_seq = max(self._next_seq, segments[-1][0] if segments else 0)

    def catch_up(self) -> None:
        """Index the keys of everything written so far now (a writer's first append would
        otherwise read the whole active segment while holding the lock)."""
        with self._locked():
            self._catch_up()

    def append(self, payloads: Sequence[Mapping[str, Any]]) -> AppendResult:
        """Write the records not already in the log (by ``KEY_FIELD``) and fsync; returns once
        they are durable. Raises EventLogError (nothing written) for an unencodable record."""
        with self._locked():
            self._catch_up()
            seqs: list[int] = []
            duplicates: list[bool] = []
            chunks: list[bytes] = []
            seq = self._next_seq
            new_keys: dict[str, int] = {}
            for payload in payloads:
                key = payload.get(KEY_FIELD)
                if isinstance(key, str) and (key in self._keys or key in new_keys):
                    seqs.append(self._keys.get(key, new_keys.get(key, -1)))
                    duplicates.append(True)
                    continue
                chunks.append(_encode(seq, payload))  # raises before anything is written
                if isinstance(key, str):
                    new_keys[key] = seq
                seqs.append(seq)
                duplicates.append(False)
                seq += 1
            if chunks:
                self._write(b"".join(chunks), self._next_seq)
                self._keys.update(new_keys)
                self._next_seq = seq
            return AppendResult(tuple(seqs), tuple(duplicates))

    def _store_keys(self, first: int, segment: Path, segment_bytes: int, last_seq: int) -> None:
        """Under the lock: write the key file of the sealed ``segment`` (records ``first`` to
        ``last_seq``, ``segment_bytes`` long) from this writer's index, which holds every
        retained segment's keys. Durable (tmp, fsync, rename) but not needed: without it a
        new writer scans the segment."""
        keys = {k: s for k, s in self._keys.items() if first <= s <= last_seq}
        path = _keys_path(segment)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(_encode_keys(segment_bytes, last_seq, keys))
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._fsync_dir()

    def _write(self, data: bytes, first_seq: int) -> None:
        path = self._segment
        if path is None or self._offset >= self.segment_bytes:
            if path is not None:  # it is full: store its keys for the writers that start later
                self._store_keys(_segment_first(path), path, self._offset, first_seq - 1)
            path = self.root / _segment_name(first_seq)
            self._offset = 0
            self._segments_seen.add(path.name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if path != self._segment:
            self._fsync_dir()
        self._segment, self._offset = path, self._offset + len(data)

    def _fsync_dir(self, folder: Path | None = None) -> None:
        """A new file's directory entry (a segment's in ``root``, by default) must be durable
        too, or a crash loses the file."""
        if not self.fsync:
            return
        fd = os.open(folder or self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- snapshots ---------------------------------------------------------------------------

    def _snapshots(self, name: str) -> list[tuple[int, Path]]:
        """(seq, path) of the stored snapshots called ``name``, oldest first."""
        prefix = check_snapshot_name(name) + "-"
        out = []
        for path in (self.root / "snapshots").glob(f"{prefix}*.bin"):
            seq = path.stem[len(prefix) :]
            if seq.isdigit():
                out.append((int(seq), path))
        return sorted(out)

    def save_snapshot(self, name: str, seq: int, data: bytes) -> None:
        """Store ``data``, a reader's state after every record below ``seq``, as ``name``
        (durably: tmp file, fsync, rename), then delete that name's older snapshots. Keyed by
        seq, so when two readers save at once the newer state is the one found."""
        folder = self.root / "snapshots"
        folder.mkdir(exist_ok=True)
        path = folder / f"{check_snapshot_name(name)}-{seq:012d}.bin"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        self._fsync_dir(folder)
        for older, old_path in self._snapshots(name):
            if older < seq:
                old_path.unlink(missing_ok=True)

    def snapshot_seq(self, name: str) -> int | None:
        """The seq of the newest snapshot called ``name`` (None: there is none)."""
        found = self._snapshots(name)
        return found[-1][0] if found else None

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """The newest snapshot called ``name``: (seq, data), or None."""
        for _ in range(3):  # a concurrent save may delete the one listed: list again
            found = self._snapshots(name)
            if not found:
                return None
            seq, path = found[-1]
            try:
                return seq, path.read_bytes()
            except FileNotFoundError:
                continue
        return None

    def retain(self, min_seq: int) -> int:
        """Delete segments whose records all have ``seq < min_seq`` (never the active one);
        returns how many. Their keys leave the idempotency window."""
        dropped = 0
        with self._locked():
            segments = self.segments()
            for (_, path), (following, _) in itertools.pairwise(segments):
                if following > min_seq:
                    break
                _keys_path(path).unlink(missing_ok=True)  # first: a segment may lack one
                path.unlink()
                dropped += 1
            if dropped:
                self._catch_up()
        return dropped
