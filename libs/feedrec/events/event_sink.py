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

Events that cannot be attributed are kept, not dropped: ``rejected/live-<start>-<end>.jsonl``
holds each with its reason (late: after its feed's window closed; unknown request; mismatch:
the post, user or variant differ from what was served).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feedrec.data.log_import import LOG_SCHEMA
from feedrec.events.event_bus import EventBus
from feedrec.events.feed_event import (
    EVENT,
    FEEDBACK_TYPES,
    SERVED,
    SHADOW,
    attribution_problem,
)
from feedrec.schema.registry import LABELS, TASKS
from feedrec.serving.api import MAX_COUNT
from feedrec.world.layout import WorldLayout

#: Live impression ids: far above any generated or imported id (those count from 0), and
#: derived from the served record's bus seq, so a rewritten range gets the same ids.
LIVE_ID_BASE = 1 << 62
STATE_VERSION = 1

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

    attribution_window_s: float = 1800.0
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
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"sink: {self.records} bus records ({self.served} feeds, {self.events} events) -> "
            f"{self.log_rows} log rows, {self.exposure_rows} exposure rows from "
            f"{self.feeds_written} feeds, {self.shadow_rows} shadow rows; rejected: {rejected}; "
            f"waiting: {self.pending_feeds} feeds in their window, {self.waiting_events} "
            f"events without their feed yet; next seq {self.next_seq}"
        )


def _empty_state() -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "next_seq": 0,
        "inflight": None,
        "watermark": 0.0,
        "pending": {},  # request_id -> served record + "seq" + "slots": {position: labels}
        "waiting": [],  # events whose served record has not been read yet
        "finalized": {},  # request_id -> received_at, to tell late events from unknown ones
    }


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(tmp_path)``, fsync, then rename over ``path`` (and fsync the dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        return report

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
        pending: dict[str, Any] = state["pending"]
        finalized: dict[str, float] = state["finalized"]
        waiting: list[dict[str, Any]] = state["waiting"]
        rejected: list[dict[str, Any]] = []
        shadows: list[dict[str, Any]] = []
        watermark = float(state["watermark"])
        for record in self._records(start, end):
            report.records += 1
            watermark = max(watermark, float(record.get("received_at", 0.0)))
            if record.get("kind") == SERVED:
                report.served += 1
                rid = record["request_id"]
                if rid in pending or rid in finalized:
                    continue
                record["slots"] = {}
                pending[rid] = record
                still = []
                for event in waiting:
                    if event["request_id"] == rid:
                        self._attribute(record, event, rejected)
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
        window = self.cfg.attribution_window_s
        done = [
            rid
            for rid, served in pending.items()
            if flush or served["received_at"] <= watermark - window
        ]
        feeds = [pending.pop(rid) for rid in sorted(done, key=lambda r: pending[r]["seq"])]
        for served in feeds:
            finalized[served["request_id"]] = served["received_at"]
        cutoff = watermark - window
        expired = [e for e in waiting if flush or e["received_at"] <= cutoff]
        waiting[:] = [e for e in waiting if not (flush or e["received_at"] <= cutoff)]
        rejected += [{**e, "reason": "unknown request_id"} for e in expired]
        for rid in [r for r, t in finalized.items() if t <= watermark - 2 * window]:
            del finalized[rid]  # an event this late is rejected as unknown instead of late
        state["watermark"] = watermark
        self._write(start, end, feeds, rejected, report)
        self._write_shadow(start, end, shadows, report)
        for event in rejected:
            report.rejected[event["reason"].split(":")[0]] += 1
        report.feeds_written += len(feeds)
        state["next_seq"] = end
        state["inflight"] = None
        if not crash:
            self._commit(state)
        return state

    @staticmethod
    def _attribute(
        served: dict[str, Any], event: dict[str, Any], rejected: list[dict[str, Any]]
    ) -> None:
        posts = [int(item["post_id"]) for item in served["items"]]
        problem = attribution_problem(served["user_id"], posts, served["variant"], event)
        if problem is not None:
            rejected.append({**event, "reason": f"mismatch: {problem}"})
            return
        position = int(event["position"])
        slot = served["slots"].setdefault(str(position), {"types": [], "dwell": 0.0})
        if event["type"] not in slot["types"]:
            slot["types"].append(event["type"])
        if event["type"] == "dwell":
            slot["dwell"] = max(slot["dwell"], float(event["dwell_s"]))

    def _write(
        self,
        start: int,
        end: int,
        feeds: list[dict[str, Any]],
        rejected: list[dict[str, Any]],
        report: SinkReport,
    ) -> None:
        name = f"live-{start:012d}-{end:012d}"
        rows = _exposure_rows(feeds)
        if rows["request_id"]:
            table = pa.table(rows, schema=EXPOSURE_SCHEMA)
            days = np.floor(np.asarray(rows["ts"])).astype(np.int64)
            for day in np.unique(days):
                part = table.filter(pa.array(days == day))
                impressed = part.filter(pc.equal(part["impressed"], 1))
                paths = (
                    (self.world.log_day(int(day)) / f"{name}.parquet", impressed, LOG_SCHEMA),
                    (self.live / "exposures" / f"day={day}" / f"{name}.parquet", part, None),
                )
                for path, data, schema in paths:
                    if schema is not None:
                        if data.num_rows == 0:
                            continue
                        data = data.select(schema.names).cast(schema)
                    _atomic_write(path, lambda tmp, data=data: pq.write_table(data, tmp))
                    report.files.append(str(path))
                report.log_rows += impressed.num_rows
                report.exposure_rows += part.num_rows
        if rejected:
            path = self.live / "rejected" / f"{name}.jsonl"
            text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in rejected)
            _atomic_write(path, lambda tmp: tmp.write_text(text))
            report.files.append(str(path))

    def _write_shadow(
        self, start: int, end: int, shadows: list[dict[str, Any]], report: SinkReport
    ) -> None:
        rows = _shadow_rows(shadows)
        if not rows["request_id"]:
            return
        table = pa.table(rows, schema=SHADOW_SCHEMA)
        days = np.floor(np.asarray(rows["ts"])).astype(np.int64)
        for day in np.unique(days):
            part = table.filter(pa.array(days == day))
            path = self.live / "shadow" / f"day={day}" / f"live-{start:012d}-{end:012d}.parquet"
            _atomic_write(path, lambda tmp, part=part: pq.write_table(part, tmp))
            report.files.append(str(path))
        report.shadow_rows += table.num_rows


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
    """Columns of ``EXPOSURE_SCHEMA`` for every slot of the finalised feeds."""
    rows: dict[str, list[Any]] = {f.name: [] for f in EXPOSURE_SCHEMA}
    for served in feeds:
        for item in served["items"]:
            position = int(item["position"])
            slot = served["slots"].get(str(position))
            types = set(slot["types"]) if slot else set()
            engaged = {e for e in FEEDBACK_TYPES if e in types}
            viewed = bool(engaged) or "view" in types or (slot is not None and slot["dwell"] > 0)
            rows["request_id"].append(served["request_id"])
            rows["impression_id"].append(LIVE_ID_BASE + served["seq"] * MAX_COUNT + position)
            for key in ("variant", "user_id", "ts", "received_at", "model_version", "snapshot"):
                rows[key].append(served[key])
            rows["fallback"].append(bool(served["fallback"]))
            rows["cold_start"].append(bool(served["cold_start"]))
            rows["latency_ms"].append(float(served["latency_ms"]))
            rows["post_id"].append(int(item["post_id"]))
            rows["position"].append(position)
            rows["score"].append(float(item["score"]))
            for task in TASKS:
                rows[f"pred_{task}"].append(item["scores"].get(task))
            rows["propensity"].append(float(item["propensity"]))
            # Records written before exploration existed carry neither key.
            rows["explored"].append(bool(served.get("explored", False)))
            rows["pool"].append(served.get("pool") or [])
            rows["impressed"].append(int(slot is not None))
            rows["view"].append(int(viewed))
            for e in FEEDBACK_TYPES:
                rows[e].append(int(e in engaged))
            rows["dwell"].append(float(slot["dwell"]) if slot and viewed else 0.0)
    return rows
