"""The event bus, chosen by a location: a directory is the embedded log
(:class:`~feedrec.events.event_log.EventLog`), ``redis://host:port/db?stream=NAME`` a Redis
stream (:class:`~feedrec.events.redis_event_log.RedisEventLog`). Both give the same guarantees:
seqs 0, 1, ... in append order, a record acknowledged only once durable, idempotency keys
deduplicated at append across every writer, and retention of what the sink has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from feedrec.events.event_log import AppendResult, EventLog, LogRecord
from feedrec.events.redis_event_log import SCHEME, RedisEventLog, RedisLocation, redact


class EventBus(Protocol):
    """What the recorder (writes), the sink (reads, retention) and the real-time signals
    (reads, snapshots of their state) need from a bus."""

    def append(self, payloads: Sequence[Mapping[str, Any]]) -> AppendResult:
        """Write the records whose idempotency key is new; return once they are durable."""
        ...

    def records(self, start_seq: int = 0) -> Iterator[LogRecord]:
        """Every record with ``seq >= start_seq`` in order (EventLogError if retention
        dropped ``start_seq``)."""
        ...

    def seq_at(self, unix_s: float) -> int:
        """A seq at or before the first record received at or after ``unix_s`` (so that
        ``records(seq_at(t))`` holds every record since ``t``, maybe a few older ones)."""
        ...

    def end_seq(self) -> int:
        """The seq the next appended record gets."""
        ...

    def retain(self, min_seq: int) -> int:
        """Drop (some of) the records below ``min_seq``; returns how many units went."""
        ...

    def save_snapshot(self, name: str, seq: int, data: bytes) -> None:
        """Store ``data``, a reader's state after every record below ``seq``, as ``name``
        (kept next to the bus, so every reader of the bus finds it; the newer seq wins)."""
        ...

    def snapshot_seq(self, name: str) -> int | None:
        """The seq of the newest snapshot called ``name`` (None: there is none); cheap."""
        ...

    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """The newest snapshot called ``name``: (seq, data), or None."""
        ...


def bus_location(location: str | Path) -> Path | RedisLocation:
    """Parse a bus location without opening it: a directory path, or a Redis location.
    Raises ValueError naming the bad part of a malformed ``redis://`` URL, or an unknown
    scheme."""
    if isinstance(location, Path):
        return location
    text = str(location).strip()
    if not text:
        raise ValueError("event bus location is empty: give a directory or a redis:// URL")
    scheme, sep, _ = text.partition(":")
    if sep and (scheme.lower() == SCHEME or "://" in text):
        if scheme != SCHEME:
            raise ValueError(
                f"event bus {redact(text)}: scheme {scheme!r} is not supported; give "
                f"a directory or {SCHEME}://host:port/db?stream=NAME"
            )
        return RedisLocation.parse(text)
    return Path(text)


def open_event_bus(location: str | Path, *, require_fsync: bool = True) -> EventBus:
    """The bus at ``location`` (see :func:`bus_location`). ``require_fsync`` (Redis only):
    refuse a server that would acknowledge records before they are fsynced."""
    where = bus_location(location)
    if isinstance(where, RedisLocation):
        return RedisEventLog(where, require_fsync=require_fsync)
    return EventLog(where)
