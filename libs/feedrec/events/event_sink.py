"""The sink job: compacts the event bus into the day-partitioned impression logs, exactly once.

It joins each client event to the served feed it names (``request_id``, ``position``) and,
once a feed's attribution window has passed, writes one log row per impressed slot (the
preprocess job's ``LOG_SCHEMA``: impression id, world time, user, post, position, propensity,
labels) and one exposure row per served slot (variant, model version, feature snapshot,
scores, latency: what experiments and skew-free rebuilds read).

Exactly once, across crashes at any point:

* the bus drops duplicate deliveries by idempotency key (``EventLog.append``), and labels are
  idempotent anyway (a second ``like`` of the same impression sets the same bit; dwell is the
  longest reported);
* output files are named after the bus range they come from, ``live-<start>-<end>.parquet``,
  and written atomically (tmp file, fsync, rename);
* before writing a range the sink records its intent (``inflight``) in its state file; a sink
  restarted after a crash redoes exactly that range from the last committed state, so the
  files it rewrites are the same files with the same rows, then commits the new state.

Memory does not grow with the payloads waiting in their window: an open feed is held (and
committed) as its attribution key only (seq, time, user, variant, posts by slot, labels so
far); its full served record stays on the bus, which is re-read in seq order when the feed is
written, a bounded chunk of feeds at a time, streamed into the range's Parquet files. So the
bus must keep every record at or above the report's ``retain_below``.

Events that cannot be attributed are kept, not dropped: ``rejected/live-<start>-<end>.jsonl``
holds each with its reason (late: after its feed's window closed; unknown request; mismatch:
the post, user or variant differ from what was served).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedrec.data.log_import import LOG_SCHEMA
from feedrec.events.event_bus import EventBus
from feedrec.events.event_log import EventLogError
from feedrec.events.feed_event import (
    ATTRIBUTION_WINDOW_S,
    EVENT,
    FEEDBACK_TYPES,
    SERVED,
    SHADOW,
    attribution_problem,
    clock_record,
)
from feedrec.events.redis_event_log import EventBusUnavailable
from feedrec.schema.registry import LABELS, TASKS
from feedrec.serving.api import MAX_COUNT
from feedrec.world.layout import WorldLayout

#: Live impression ids: far above any generated or imported id (those count from 0), and
#: derived from the served record's bus seq, so a rewritten range gets the same ids.
LIVE_ID_BASE = 1 << 62
STATE_VERSION = 2
#: Feeds (and shadow feeds) turned into rows and written per chunk: bounds the rows in memory.
CHUNK_FEEDS = 1000

EXPOSURE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("impression_id", pa.int64()),
        pa.field("variant", pa.string()),
        pa.field("user_id", pa.int64()),
        pa.field("post_id", pa.int64()),
        pa.field("position", pa.int64()),
        pa.field("ts", pa.float64()),
        pa.field("received_at", pa.float64()),
        pa.field("model_version", pa.string()),
        pa.field("snapshot", pa.string()),
        pa.field("fallback", pa.bool_()),
        pa.field("cold_start", pa.bool_()),
        pa.field("latency_ms", pa.float32()),
        pa.field("score", pa.float32()),
        *[pa.field(f"pred_{task}", pa.float32()) for task in TASKS],
        pa.field("propensity", pa.float32()),
        pa.field("explored", pa.bool_()),
        pa.field("pool", pa.list_(pa.int64())),
        pa.field("impressed", pa.int8()),
        *[pa.field(label, pa.int8()) for label in LABELS if label != "dwell"],
        pa.field("dwell", pa.float32()),
    ]
)

#: One row per slot of a shadow feed (what the shadow ranker would have served; never shown).
#: ``served_position``: that post's slot in the served feed of the same request, -1 if none.
SHADOW_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("variant", pa.string()),
        pa.field("user_id", pa.int64()),
        pa.field("ts", pa.float64()),
        pa.field("received_at", pa.float64()),
        pa.field("served_model_version", pa.string()),
        pa.field("shadow_model_version", pa.string()),
        pa.field("latency_ms", pa.float32()),
        pa.field("post_id", pa.int64()),
        pa.field("position", pa.int64()),
        pa.field("score", pa.float32()),
        *[pa.field(f"pred_{task}", pa.float32()) for task in TASKS],
        pa.field("served_position", pa.int64()),
    ]
)


@dataclass(frozen=True)
class SinkConfig:
    """attribution_window_s: how long after a feed is served its events still count (bus
    receive time); later ones are rejected as late. max_records: bus records per output range
    (bounds the sink's memory per step)."""

    attribution_window_s: float = ATTRIBUTION_WINDOW_S
    max_records: int = 200_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.attribution_window_s) and self.attribution_window_s > 0):
            raise ValueError(
                f"sink config: attribution_window_s must be > 0, got {self.attribution_window_s}"
            )
        if self.max_records < 1:
            raise ValueError(f"sink config: max_records must be >= 1, got {self.max_records}")


@dataclass
class SinkReport:
    """What one :meth:`EventSink.run` did (counts over all ranges it committed)."""

    next_seq: int = 0
    records: int = 0
    served: int = 0
    events: int = 0
    feeds_written: int = 0
    log_rows: int = 0
    exposure_rows: int = 0
    shadow_rows: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    pending_feeds: int = 0
    waiting_events: int = 0
    retain_below: int = 0
    bus_time: float = 0.0  # the newest ``received_at`` read (unix s): the sink's clock
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"sink: {self.records} bus records ({self.served} feeds, {self.events} events) -> "
            f"{self.log_rows} log rows, {self.exposure_rows} exposure rows from "
            f"{self.feeds_written} feeds, {self.shadow_rows} shadow rows; rejected: {rejected}; "
            f"waiting: {self.pending_feeds} feeds in their window, {self.waiting_events} "
            f"events without their feed yet; next seq {self.next_seq}; the sink needs no bus "
            f"record below seq {self.retain_below}"
        )


def _empty_state() -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "next_seq": 0,
        "inflight": None,
        "watermark": 0.0,
        "pending": {},  # request_id -> _pending_entry(served record) + "slots": {position: labels}
        "waiting": [],  # events whose served record has not been read yet
        "finalized": {},  # request_id -> received_at, to tell late events from unknown ones
    }


def _pending_entry(served: dict[str, Any]) -> dict[str, Any]:
    """What an open feed keeps in the state: enough to attribute its events (``seq`` finds
    the full served record on the bus when the feed is written)."""
    return {
        "seq": int(served["seq"]),
        "received_at": float(served["received_at"]),
        "user_id": int(served["user_id"]),
        "variant": served["variant"],
        "posts": [int(item["post_id"]) for item in served["items"]],
        "slots": served.get("slots", {}),
    }


def _migrate(state: dict[str, Any]) -> dict[str, Any]:
    """State version 1 held each open feed's whole served record; keep its key only."""
    state["pending"] = {rid: _pending_entry(served) for rid, served in state["pending"].items()}
    state["version"] = STATE_VERSION
    return state


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, path: Path) -> None:
    """fsync the written ``tmp``, rename it over ``path``, fsync the directory."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)``, then :func:`_publish` it as ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    _publish(tmp, path)


class _RangeFiles:
    """The Parquet files of one bus range, written in chunks (one row group each) to tmp
    files, then each fsynced and renamed into place by :meth:`commit` (a crash before that
    leaves only tmp files, which the redo overwrites)."""

    def __init__(self) -> None:
        self._open: dict[Path, tuple[Path, pq.ParquetWriter]] = {}

    def write(self, path: Path, table: pa.Table) -> None:
        if path not in self._open:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            self._open[path] = (tmp, pq.ParquetWriter(tmp, table.schema))
        self._open[path][1].write_table(table)

    def commit(self) -> list[Path]:
        for path, (tmp, writer) in self._open.items():
            writer.close()
            _publish(tmp, path)
        paths = list(self._open)
        self._open.clear()
        return paths

    def abort(self) -> None:
        for tmp, writer in self._open.values():
            writer.close()
            tmp.unlink(missing_ok=True)
        self._open.clear()


class EventSink:
    """Compacts the bus at ``log`` into the world at ``world_dir``:

    * ``logs/day=D/live-<start>-<end>.parquet``: impressed slots (``LOG_SCHEMA``);
    * ``live/exposures/day=D/live-<start>-<end>.parquet``: every served slot
      (``EXPOSURE_SCHEMA``);
    * ``live/shadow/day=D/live-<start>-<end>.parquet``: every slot of the shadow ranker's
      feeds (``SHADOW_SCHEMA``), written as they arrive (nothing to attribute);
    * ``live/rejected/live-<start>-<end>.jsonl``: events that could not be attributed;
    * ``live/sink_state.json``: the committed bus position and the open attribution windows.
    """

    def __init__(self, log: EventBus, world_dir: Path, cfg: SinkConfig | None = None) -> None:
        self.log = log
        self.world = WorldLayout(Path(world_dir))
        self.cfg = cfg or SinkConfig()
        self.live = self.world.root / "live"
        self.state_path = self.live / "sink_state.json"

    def close_day(self) -> int:
        """Count the world's first open day, whose live rows the sink wrote, as a day of the
        world (``world.json`` ``n_days`` + 1, recorded in ``appended.json``), so preprocess
        and retraining read it. Refused while any feed is still in its attribution window
        (run with ``flush`` first) or when the day has no live rows. Returns the day."""
        from feedrec.world.generator import APPENDED_FILE, load_world_config, read_appended

        cfg = load_world_config(self.world)
        day = cfg.n_days
        state = self.state()
        if state["pending"] or state["waiting"] or state["inflight"]:
            raise ValueError(
                f"day {day}: {len(state['pending'])} feeds are still in their attribution "
                "window; run the sink with flush first"
            )
        if not any(self.world.log_day(day).glob("live-*.parquet")):
            raise ValueError(f"day {day} has no live rows in {self.world.log_day(day)}")
        record = read_appended(self.world)
        record["appends"].append({"first_day": day, "n_days": 1, "source": "live"})
        _atomic_write(
            self.world.root / APPENDED_FILE,
            lambda tmp: tmp.write_text(json.dumps(record, indent=2)),
        )
        # Last: until world.json grows, readers of the world do not see the new day.
        grown = json.dumps(cfg.with_overrides(n_days=day + 1).to_dict(), indent=2)
        _atomic_write(self.world.config, lambda tmp: tmp.write_text(grown))
        return day

    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return _empty_state()
        state = json.loads(self.state_path.read_text())
        if state.get("version") == 1:
            return _migrate(state)
        if state.get("version") != STATE_VERSION:
            version = state.get("version")
            raise ValueError(f"{self.state_path}: unknown sink state version {version}")
        return dict(state)

    def _commit(self, state: dict[str, Any]) -> None:
        _atomic_write(self.state_path, lambda tmp: tmp.write_text(json.dumps(state)))

    def run(self, *, flush: bool = False, crash_after_files: bool = False) -> SinkReport:
        """Compact everything on the bus now. ``flush``: close every attribution window (end
        of day, or the end of a simulation): all open feeds are written and waiting events
        rejected as unknown. ``crash_after_files`` (tests): stop after writing a range's files,
        before committing it, as a crash there would."""
        report = SinkReport()
        state = self.state()
        inflight = state["inflight"]
        if inflight is not None:  # a crash between intent and commit: redo exactly that range
            state = self._step(
                state, inflight["end_seq"], inflight["flush"], report, crash=crash_after_files
            )
            if crash_after_files:
                return report
        while True:
            end = self.log.end_seq()
            end = min(end, state["next_seq"] + self.cfg.max_records)
            last = end >= self.log.end_seq()
            if end <= state["next_seq"] and not (flush and last and self._open(state)):
                break
            close = flush and last
            state["inflight"] = {"end_seq": end, "flush": close}
            self._commit(state)
            state = self._step(state, end, close, report, crash=crash_after_files)
            if crash_after_files or last:
                break
        report.next_seq = state["next_seq"]
        report.pending_feeds = len(state["pending"])
        report.waiting_events = len(state["waiting"])
        report.retain_below = self.retain_below(state)
        report.bus_time = float(state["watermark"])
        return report

    def follow(
        self,
        interval_s: float,
        stop: threading.Event,
        on_pass: Callable[[SinkReport, tuple[int, int] | None], None],
        *,
        keep_s: float | None = None,
        on_outage: Callable[[EventBusUnavailable], None] | None = None,
    ) -> None:
        """Run as a long-lived job: compact what reached the bus, then (with ``keep_s``)
        apply :meth:`retain`, every ``interval_s`` until ``stop`` is set; ``on_pass`` gets
        each pass's report and retention (kept from, dropped). A window closes when bus time
        (the newest record's ``received_at``) passes it. While feeds or events wait and no
        record came for ``interval_s``, a pass appends a ``clock`` record with this host's
        time, so that the last feeds' windows close after traffic stops too, and a redo reads
        the same closing. Stopping between passes loses nothing; a kill in the middle of one is
        the crash that ``run`` redoes. A bus that is unreachable for a pass (Redis restarting)
        is reported to ``on_outage`` and tried again next pass; any other error ends the
        job."""
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError(f"sink follow: interval_s must be > 0, got {interval_s}")
        while True:
            try:
                report = self.run()
                self._advance_clock(report, interval_s)
                retained = self.retain(keep_s) if keep_s is not None else None
            except EventBusUnavailable as e:
                if on_outage is None:
                    raise
                on_outage(e)
            else:
                on_pass(report, retained)
            if stop.wait(interval_s):
                return

    def _advance_clock(self, report: SinkReport, idle_s: float) -> None:
        """After a pass (``report``): append a ``clock`` record if something waits for its
        window and the bus's newest record is older than ``idle_s``, since only bus records
        move the sink's time."""
        now = time.time()
        waiting = report.pending_feeds or report.waiting_events
        if waiting and report.bus_time < now - idle_s:
            self.log.append([clock_record(now)])

    def retain(self, keep_s: float, *, now: float | None = None) -> tuple[int, int]:
        """Drop the bus records that the sink will not read again and that were received
        more than ``keep_s`` before ``now`` (a starting replica replays the recent ones, and
        a retried event's idempotency key is only recognised while its record is kept).
        Returns (the seq kept from, the units the bus dropped: segments or entries)."""
        if not (math.isfinite(keep_s) and keep_s >= 0):
            raise ValueError(f"retention: keep_s must be >= 0, got {keep_s}")
        since = (time.time() if now is None else now) - keep_s
        min_seq = min(self.retain_below(self.state()), self.log.seq_at(since))
        return min_seq, self.log.retain(min_seq)

    @staticmethod
    def retain_below(state: dict[str, Any]) -> int:
        """The lowest bus seq the sink will read again: the oldest open feed's served record,
        else the next unread record. Retention may drop everything below it."""
        return min([int(e["seq"]) for e in state["pending"].values()] + [state["next_seq"]])

    @staticmethod
    def _open(state: dict[str, Any]) -> bool:
        return bool(state["pending"] or state["waiting"])

    def _records(self, start: int, end: int) -> Iterator[dict[str, Any]]:
        for record in self.log.records(start):
            if record.seq >= end:
                return
            yield {**record.payload, "seq": record.seq}

    def _step(
        self,
        committed: dict[str, Any],
        end: int,
        flush: bool,
        report: SinkReport,
        crash: bool = False,
    ) -> dict[str, Any]:
        """Apply bus records [next_seq, end) to a copy of the committed state, write the
        range's files, then commit (unless ``crash``)."""
        state = json.loads(json.dumps(committed))  # deep copy: the committed state stays
        start = state["next_seq"]
        name = f"live-{start:012d}-{end:012d}"
        files = _RangeFiles()
        try:
            feeds, rejected = self._apply(state, end, flush, files, name, report)
            self._write_feeds(feeds, files, name, report)
            for path in files.commit():
                report.files.append(str(path))
        except BaseException:
            files.abort()
            raise
        if rejected:
            path = self.live / "rejected" / f"{name}.jsonl"
            text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in rejected)
            _atomic_write(path, lambda tmp: tmp.write_text(text))
            report.files.append(str(path))
        for event in rejected:
            report.rejected[event["reason"].split(":")[0]] += 1
        state["next_seq"] = end
        state["inflight"] = None
        if not crash:
            self._commit(state)
        return state

    def _apply(
        self,
        state: dict[str, Any],
        end: int,
        flush: bool,
        files: _RangeFiles,
        name: str,
        report: SinkReport,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Read bus records [next_seq, end) into ``state`` (open feeds, waiting events, the
        watermark); shadow feeds go straight to ``files``. Returns the open-feed entries
        whose window closed (in seq order, out of ``state``) and the rejected events."""
        pending: dict[str, Any] = state["pending"]
        finalized: dict[str, float] = state["finalized"]
        waiting: list[dict[str, Any]] = state["waiting"]
        rejected: list[dict[str, Any]] = []
        shadows: list[dict[str, Any]] = []
        watermark = float(state["watermark"])
        for record in self._records(state["next_seq"], end):
            report.records += 1
            watermark = max(watermark, float(record.get("received_at", 0.0)))
            if record.get("kind") == SERVED:
                report.served += 1
                rid = record["request_id"]
                if rid in pending or rid in finalized:
                    continue
                entry = pending[rid] = _pending_entry(record)
                still = []
                for event in waiting:
                    if event["request_id"] == rid:
                        self._attribute(entry, event, rejected)
                    else:
                        still.append(event)
                waiting[:] = still
            elif record.get("kind") == EVENT:
                report.events += 1
                rid = record["request_id"]
                if rid in pending:
                    self._attribute(pending[rid], record, rejected)
                elif rid in finalized:
                    rejected.append({**record, "reason": "late: its feed's window had closed"})
                else:
                    waiting.append(record)
            elif record.get("kind") == SHADOW:
                shadows.append(record)
                if len(shadows) >= CHUNK_FEEDS:
                    self._write_shadow(shadows, files, name, report)
                    shadows = []
        self._write_shadow(shadows, files, name, report)
        cutoff = watermark - self.cfg.attribution_window_s
        done = [rid for rid, entry in pending.items() if flush or entry["received_at"] <= cutoff]
        done.sort(key=lambda rid: pending[rid]["seq"])
        for rid in done:
            finalized[rid] = pending[rid]["received_at"]
        feeds = [pending.pop(rid) for rid in done]
        expired = [e for e in waiting if flush or e["received_at"] <= cutoff]
        waiting[:] = [e for e in waiting if not (flush or e["received_at"] <= cutoff)]
        rejected += [{**e, "reason": "unknown request_id"} for e in expired]
        for rid in [r for r, t in finalized.items() if t <= cutoff - self.cfg.attribution_window_s]:
            del finalized[rid]  # an event this late is rejected as unknown instead of late
        state["watermark"] = watermark
        return feeds, rejected

    @staticmethod
    def _attribute(
        entry: dict[str, Any], event: dict[str, Any], rejected: list[dict[str, Any]]
    ) -> None:
        problem = attribution_problem(entry["user_id"], entry["posts"], entry["variant"], event)
        if problem is not None:
            rejected.append({**event, "reason": f"mismatch: {problem}"})
            return
        position = int(event["position"])
        slot = entry["slots"].setdefault(str(position), {"types": [], "dwell": 0.0})
        if event["type"] not in slot["types"]:
            slot["types"].append(event["type"])
        if event["type"] == "dwell":
            slot["dwell"] = max(slot["dwell"], float(event["dwell_s"]))

    def _served(self, feeds: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The full served record of each open-feed entry in ``feeds`` (in seq order), with
        its ``slots``: one pass over the bus from the first one's seq."""
        if not feeds:
            return
        wanted = iter(feeds)
        entry = next(wanted)
        records = self.log.records(entry["seq"])
        while True:
            try:
                record = next(records, None)
            except EventLogError as e:  # retention dropped it: say what the sink needed
                raise EventLogError(
                    f"sink: the feed served at bus seq {entry['seq']} is still to be written, "
                    f"but {e}; retention must keep every seq >= the sink's retain_below"
                ) from e
            if record is None or record.seq > entry["seq"]:
                raise EventLogError(f"sink: the bus has no record at seq {entry['seq']}")
            if record.seq < entry["seq"]:
                continue
            yield {**record.payload, "seq": record.seq, "slots": entry["slots"]}
            following = next(wanted, None)
            if following is None:
                return
            entry = following

    def _write_feeds(
        self, feeds: list[dict[str, Any]], files: _RangeFiles, name: str, report: SinkReport
    ) -> None:
        """Stream the finalised ``feeds`` into the range's log and exposure files, one chunk
        of :data:`CHUNK_FEEDS` served records at a time."""
        chunk: list[dict[str, Any]] = []
        for served in self._served(feeds):
            chunk.append(served)
            if len(chunk) >= CHUNK_FEEDS:
                self._write_chunk(chunk, files, name, report)
                chunk = []
        self._write_chunk(chunk, files, name, report)
        report.feeds_written += len(feeds)

    def _write_chunk(
        self, feeds: list[dict[str, Any]], files: _RangeFiles, name: str, report: SinkReport
    ) -> None:
        for day, part in _by_day(_exposure_rows(feeds), EXPOSURE_SCHEMA):
            impressed = part.filter(pc.equal(part["impressed"], 1))
            if impressed.num_rows:
                log = impressed.select(LOG_SCHEMA.names).cast(LOG_SCHEMA)
                files.write(self.world.log_day(int(day)) / f"{name}.parquet", log)
            files.write(self.live / "exposures" / f"day={day}" / f"{name}.parquet", part)
            report.log_rows += impressed.num_rows
            report.exposure_rows += part.num_rows

    def _write_shadow(
        self, shadows: list[dict[str, Any]], files: _RangeFiles, name: str, report: SinkReport
    ) -> None:
        for day, part in _by_day(_shadow_rows(shadows), SHADOW_SCHEMA):
            files.write(self.live / "shadow" / f"day={day}" / f"{name}.parquet", part)
            report.shadow_rows += part.num_rows


def _by_day(rows: dict[str, list[Any]], schema: pa.Schema) -> Iterator[tuple[int, pa.Table]]:
    """The rows (columns of ``schema``) as one table per world day of their ``ts``."""
    if not rows["ts"]:
        return
    table = pa.table(rows, schema=schema)
    days = np.floor(np.asarray(rows["ts"])).astype(np.int64)
    for day in np.unique(days):
        yield int(day), table.filter(pa.array(days == day))


def _shadow_rows(shadows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Columns of ``SHADOW_SCHEMA`` for every slot of the shadow feeds."""
    rows: dict[str, list[Any]] = {f.name: [] for f in SHADOW_SCHEMA}
    keys: tuple[str, ...] = ("request_id", "variant", "user_id", "ts", "received_at")
    keys += ("served_model_version", "shadow_model_version", "latency_ms")  # per feed
    for shadow in shadows:
        for item in shadow["items"]:
            for key in keys:
                rows[key].append(shadow[key])
            for key in ("post_id", "position", "score", "served_position"):
                rows[key].append(item[key])
            for task in TASKS:
                rows[f"pred_{task}"].append(item["scores"].get(task))
    return rows


def _exposure_rows(feeds: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Columns of ``EXPOSURE_SCHEMA`` for every slot of the finalised feeds (built a feed,
    not a slot, at a time: most slots were never seen, and the sink's cost is these rows)."""
    rows: dict[str, list[Any]] = {f.name: [] for f in EXPOSURE_SCHEMA}
    per_feed = ("variant", "user_id", "ts", "received_at", "model_version", "snapshot")
    labels = ("view", *FEEDBACK_TYPES)
    for served in feeds:
        items = served["items"]
        n = len(items)
        positions = [int(item["position"]) for item in items]
        rows["request_id"] += [served["request_id"]] * n
        base = LIVE_ID_BASE + served["seq"] * MAX_COUNT
        rows["impression_id"] += [base + position for position in positions]
        for key in per_feed:
            rows[key] += [served[key]] * n
        rows["fallback"] += [bool(served["fallback"])] * n
        rows["cold_start"] += [bool(served["cold_start"])] * n
        rows["latency_ms"] += [float(served["latency_ms"])] * n
        rows["post_id"] += [int(item["post_id"]) for item in items]
        rows["position"] += positions
        rows["score"] += [float(item["score"]) for item in items]
        for task in TASKS:
            rows[f"pred_{task}"] += [item["scores"].get(task) for item in items]
        rows["propensity"] += [float(item["propensity"]) for item in items]
        # Records written before exploration existed carry neither key.
        rows["explored"] += [bool(served.get("explored", False))] * n
        rows["pool"] += [served.get("pool") or []] * n
        # Labels: zero, except the slots events named.
        first = len(rows["impressed"])
        rows["impressed"] += [0] * n
        for label in labels:
            rows[label] += [0] * n
        rows["dwell"] += [0.0] * n
        for i, position in enumerate(positions):
            slot = served["slots"].get(str(position))
            if slot is None:
                continue
            types = set(slot["types"])
            engaged = [e for e in FEEDBACK_TYPES if e in types]
            viewed = bool(engaged) or "view" in types or slot["dwell"] > 0
            rows["impressed"][first + i] = 1
            rows["view"][first + i] = int(viewed)
            for e in engaged:
                rows[e][first + i] = 1
            rows["dwell"][first + i] = float(slot["dwell"]) if viewed else 0.0
    return rows
