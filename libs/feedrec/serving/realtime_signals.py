"""Real-time signals for the feed, kept up to date from the event bus within a second or so.

A thread tails the bus (the one the Ingress records served feeds on and ``/v1/events``
writes to) and applies each event to :class:`RealtimeState` (``REALTIME_FEATURES``). Only
events about a slot this service really served count (the served record names the post at
each position), as in the sink: a client cannot pump a post it was never shown. The feed
uses the signals in two stages, without retraining:

* candidates: posts of the viewer's hot topics right now (their decayed engagements), by
  engagement velocity then likes, join the retrieved ones before Triton ranks them;
* re-ranking: a post's value is multiplied by ``1 + weight * share``, ``share`` the viewer's
  decayed engagements in the post's topic over all their decayed engagements (+1 smoothing);
  posts the viewer engaged with or hid in the last hours are not suggested again.

An event counts only within ``ATTRIBUTION_WINDOW_S`` of its feed (bus time), as in the sink.

A follower saves a snapshot of its state next to the bus every ``SNAPSHOT_EVERY`` records
(the newest one wins; every replica may save, the bus keeps the newer). A starting follower
restores the newest snapshot and replays only the records after it, so a replica's start
costs the state's size plus at most about ``SNAPSHOT_EVERY`` records, whatever the traffic of
the last hours; without a usable snapshot it replays the last ``REPLAY_S``.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import zipfile
from collections import OrderedDict, deque
from dataclasses import astuple
from typing import Any

import numpy as np

from feedrec.events.event_bus import EventBus
from feedrec.events.feed_event import (
    ATTRIBUTION_WINDOW_S,
    EVENT,
    FEEDBACK_TYPES,
    SERVED,
    attribution_problem,
)
from feedrec.features.realtime_features import REALTIME_FEATURES, RealtimeState

logger = logging.getLogger("feedrec.serve")
#: Served feeds remembered to check events against (oldest forgotten first).
MAX_SERVED = 200_000
#: Posts per user remembered as engaged with or hidden (not suggested again).
MAX_RECENT_PER_USER = 200
#: Decayed engagements in a topic that make it "hot" for candidate generation.
HOT_TOPIC_MIN = 0.9
#: A starting follower replays the bus from this many of the slowest feature's half-lives
#: ago: an older event would weigh under 2**-8 of a new one. Replaying everything made a
#: replica's start grow with the bus (8.6 of its 9.5 s on a 67k-record bus, most of it served
#: feeds to parse), and a scale-up replica's start is paid while the others are overloaded.
REPLAY_HALF_LIVES = 8
REPLAY_S = REPLAY_HALF_LIVES * max(f.half_life_s for f in REALTIME_FEATURES)
#: Bus records a follower applies between two snapshots of the state: a starting follower
#: replays about this many at most after restoring the newest (2.3 s here: bench/signals.py).
SNAPSHOT_EVERY = 20_000
SNAPSHOT_NAME = "realtime-signals"
SNAPSHOT_VERSION = 1


class SnapshotError(ValueError):
    """A stored snapshot cannot be restored (damaged, another version or other features)."""


def _ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ints -> (lengths [N], values [sum of lengths]) int64."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    values = np.fromiter((v for r in rows for v in r), dtype=np.int64, count=int(lengths.sum()))
    return lengths, values


def _unragged(lengths: np.ndarray, values: np.ndarray) -> list[list[int]]:
    """Inverse of :func:`_ragged`."""
    if int(lengths.sum()) != len(values) or (lengths < 0).any():
        raise SnapshotError("snapshot: ragged lengths do not match their values")
    if not len(lengths):
        return []
    return [part.tolist() for part in np.split(values, np.cumsum(lengths)[:-1])]


class RealtimeSignals:
    """Streaming state + what the feed asks of it. ``post_topic`` [P] and ``user_segment``
    [U] map ids to the entities the features are keyed by."""

    def __init__(
        self, post_topic: np.ndarray, user_segment: np.ndarray, max_keys: int = 1_000_000
    ) -> None:
        self.state = RealtimeState(REALTIME_FEATURES, max_keys=max_keys)
        self.post_topic = post_topic
        self.user_segment = user_segment
        # request id -> (viewer, posts by slot, variant, served at), in bus order.
        self._served: OrderedDict[str, tuple[int, list[int], str, float]] = OrderedDict()
        self._recent: dict[int, deque[int]] = {}
        self._topic_keys: dict[int, set[int]] = {}  # user -> topics with engagement state
        self._lock = threading.Lock()
        self.applied = 0
        self.ignored = 0
        self.next_seq = 0
        self.watermark = 0.0  # the latest receive time read from the bus
        self.restored_from: int | None = None  # the seq of the snapshot this one started from
        self._snapshot_seq = 0  # the newest snapshot seq this follower knows of

    # -- the stream --------------------------------------------------------------------------

    def apply(self, record: dict[str, Any]) -> None:
        """One bus record (served feed or client event), in bus order."""
        received = record.get("received_at")
        at = float(received) if isinstance(received, int | float) else self.watermark
        self.watermark = max(self.watermark, at)
        if record.get("kind") == SERVED:
            posts = [int(item["post_id"]) for item in record["items"]]
            entry = (int(record["user_id"]), posts, str(record["variant"]), at)
            with self._lock:
                self._served[record["request_id"]] = entry
                self._forget_closed_feeds()
            return
        if record.get("kind") != EVENT:
            return
        with self._lock:
            self._forget_closed_feeds()
            served = self._served.get(record["request_id"])
        post, user = int(record["post_id"]), int(record["user_id"])
        valid = (
            served is not None
            and attribution_problem(*served[:3], record) is None
            and 0 <= post < len(self.post_topic)
            and 0 <= user < len(self.user_segment)
        )
        if not valid:
            self.ignored += 1
            return
        topic = int(self.post_topic[post])
        entity = {
            "user_id": user,
            "post_id": post,
            "topic": topic,
            "user_segment": int(self.user_segment[user]),
        }
        self.state.apply(record["type"], entity, float(record["received_at"]))
        if record["type"] in FEEDBACK_TYPES:
            with self._lock:
                recent = self._recent.setdefault(user, deque(maxlen=MAX_RECENT_PER_USER))
                recent.append(post)
                self._topic_keys.setdefault(user, set()).add(topic)
        self.applied += 1

    def _forget_closed_feeds(self) -> None:
        """Under the lock: drop the feeds whose attribution window closed (served before
        the watermark minus the window; oldest first), and any beyond ``MAX_SERVED``."""
        closed = self.watermark - ATTRIBUTION_WINDOW_S
        while self._served and (
            len(self._served) > MAX_SERVED or next(iter(self._served.values()))[3] < closed
        ):
            self._served.popitem(last=False)

    # -- snapshots ---------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state after the records below ``next_seq``, as an ``.npz`` (no pickles).
        Call it from the thread that applies records (the follower does), so that the state
        is the one of ``next_seq``."""
        with self._lock:
            served = list(self._served.items())
            recent = [(u, list(posts)) for u, posts in self._recent.items()]
            topics = [(u, sorted(ts)) for u, ts in self._topic_keys.items()]
        variants = sorted({entry[2] for _, entry in served})
        meta = {
            "version": SNAPSHOT_VERSION,
            "next_seq": self.next_seq,
            "watermark": self.watermark,
            "applied": self.applied,
            "ignored": self.ignored,
            "evicted": self.state.evicted,
            "features": [list(astuple(f)) for f in self.state.features.values()],
            "variants": variants,
        }
        variant_index = {v: i for i, v in enumerate(variants)}
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "served_id": np.array([rid for rid, _ in served], dtype=np.str_),
            "served_user": np.array([e[0] for _, e in served], dtype=np.int64),
            "served_variant": np.array([variant_index[e[2]] for _, e in served], np.int64),
            "served_at": np.array([e[3] for _, e in served], dtype=np.float64),
        }
        arrays["served_len"], arrays["served_posts"] = _ragged([e[1] for _, e in served])
        arrays["recent_user"] = np.array([u for u, _ in recent], dtype=np.int64)
        arrays["recent_len"], arrays["recent_posts"] = _ragged([p for _, p in recent])
        arrays["topic_user"] = np.array([u for u, _ in topics], dtype=np.int64)
        arrays["topic_len"], arrays["topic_topics"] = _ragged([t for _, t in topics])
        for i, columns in enumerate(self.state.to_arrays().values()):
            for part, values in columns.items():
                arrays[f"feature{i}_{part}"] = values
        out = io.BytesIO()
        np.savez(out, **arrays)  # type: ignore[arg-type]
        return out.getvalue()

    def restore(self, data: bytes) -> None:
        """Replace the state by a :meth:`snapshot`'s (``next_seq`` included). Raises
        SnapshotError, leaving this state as it was, if ``data`` is damaged, of another
        version, or of other feature definitions."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(arrays["meta"].tobytes())
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise SnapshotError(f"snapshot is damaged: {e}") from e
        if meta.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {meta.get('version')!r} != {SNAPSHOT_VERSION}")
        ours = [list(astuple(f)) for f in self.state.features.values()]
        if json.loads(json.dumps(ours)) != meta["features"]:
            raise SnapshotError("snapshot holds other real-time features than these")
        try:
            variants = meta["variants"]
            served = OrderedDict(
                (str(rid), (int(u), posts, variants[int(v)], float(t)))
                for rid, u, v, t, posts in zip(
                    arrays["served_id"].tolist(),
                    arrays["served_user"].tolist(),
                    arrays["served_variant"].tolist(),
                    arrays["served_at"].tolist(),
                    _unragged(arrays["served_len"], arrays["served_posts"]),
                    strict=True,
                )
            )
            recent = {
                int(u): deque(posts, maxlen=MAX_RECENT_PER_USER)
                for u, posts in zip(
                    arrays["recent_user"].tolist(),
                    _unragged(arrays["recent_len"], arrays["recent_posts"]),
                    strict=True,
                )
            }
            topic_keys = {
                int(u): set(ts)
                for u, ts in zip(
                    arrays["topic_user"].tolist(),
                    _unragged(arrays["topic_len"], arrays["topic_topics"]),
                    strict=True,
                )
            }
            state = RealtimeState(REALTIME_FEATURES, max_keys=self.state.max_keys)
            state.load_arrays(
                {
                    name: {part: arrays[f"feature{i}_{part}"] for part in ("keys", "sums", "last")}
                    for i, name in enumerate(self.state.features)
                }
            )
        except (KeyError, IndexError, ValueError) as e:
            raise SnapshotError(f"snapshot is damaged: {e!r}") from e
        state.evicted = int(meta["evicted"])
        with self._lock:
            self.state, self._served, self._recent = state, served, recent
            self._topic_keys = topic_keys
        self.applied, self.ignored = int(meta["applied"]), int(meta["ignored"])
        self.watermark = float(meta["watermark"])
        self.next_seq = self._snapshot_seq = int(meta["next_seq"])

    def _start_seq(self, bus: EventBus, replay_s: float) -> int:
        """Where a starting follower reads from: the newest snapshot's seq once it is
        restored, if that is not older than the last ``replay_s`` of the bus; else the first
        seq of those ``replay_s``, with an empty state."""
        horizon = bus.seq_at(time.time() - replay_s)
        try:
            stored = bus.snapshot_seq(SNAPSHOT_NAME)
            # Past the bus's end: a snapshot of a bus since deleted and begun again.
            if stored is None or stored < horizon or stored > bus.end_seq():
                return horizon
            found = bus.load_snapshot(SNAPSHOT_NAME)
            if found is None or found[0] < horizon:
                return horizon
            self.restore(found[1])
        except Exception as e:  # a start without the snapshot is slower, never wrong
            logger.warning("real-time signals: not restoring the snapshot: %s", e)
            return horizon
        self.restored_from = self.next_seq
        return self.next_seq

    def _maybe_snapshot(self, bus: EventBus, every: int) -> None:
        """Save a snapshot if neither this follower nor another saved one in the last
        ``every`` records."""
        if self.next_seq - self._snapshot_seq < every:
            return
        stored = bus.snapshot_seq(SNAPSHOT_NAME)
        if stored is not None and self.next_seq - stored < every:
            self._snapshot_seq = stored  # another replica's is recent enough
            return
        bus.save_snapshot(SNAPSHOT_NAME, self.next_seq, self.snapshot())
        self._snapshot_seq = self.next_seq

    # -- following the bus -------------------------------------------------------------------

    def follow(
        self,
        bus: EventBus,
        poll_s: float = 0.5,
        stop: threading.Event | None = None,
        replay_s: float = REPLAY_S,
        snapshot_every: int = SNAPSHOT_EVERY,
    ) -> threading.Thread:
        """Restore the bus's newest snapshot and apply the records after it (without a
        usable one: the records of the last ``replay_s`` seconds), then start a daemon
        thread applying its new records every ``poll_s`` and saving a snapshot every
        ``snapshot_every`` records (0: never).

        The backlog is applied here, in the caller's thread (a replica's start): in the
        thread it competed for the GIL with the first requests, which then took up to a
        second on a log of 50 MB (the spike bench's first seconds). What is older than
        ``replay_s`` is not replayed: its decayed weight is negligible (``REPLAY_S``), and an
        event about a feed served that long ago is not attributed by this replica."""
        if replay_s <= 0:
            raise ValueError(f"replay_s must be > 0, got {replay_s}")
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        stop = stop or threading.Event()
        if self.next_seq == 0:
            self.next_seq = self._start_seq(bus, replay_s)

        def catch_up() -> None:
            try:
                for record in bus.records(self.next_seq):
                    self.apply(record.payload)
                    self.next_seq = record.seq + 1
            except Exception as e:  # keep following: the bus may be back at the next poll
                logger.warning("real-time signals: reading the bus failed: %r", e)

        def loop() -> None:
            while not stop.wait(poll_s):
                catch_up()
                if not snapshot_every:
                    continue
                try:
                    self._maybe_snapshot(bus, snapshot_every)
                except Exception as e:  # the next one is tried after as many records
                    logger.warning("real-time signals: saving a snapshot failed: %r", e)
                    self._snapshot_seq = self.next_seq

        catch_up()
        thread = threading.Thread(target=loop, name="realtime-signals", daemon=True)
        thread.start()
        return thread

    # -- what the feed asks ------------------------------------------------------------------

    def topic_share(self, user: int, topics: np.ndarray, now: float | None = None) -> np.ndarray:
        """[N] the viewer's decayed engagements in each of ``topics`` over all theirs (+1)."""
        now = time.time() if now is None else now
        total = self.state.value("user_engagements", (user,), now)
        if total <= 0:
            return np.zeros(len(topics))
        per_topic = {
            int(t): self.state.value("user_topic_engagements", (user, int(t)), now)
            for t in np.unique(topics)
        }
        return np.array([per_topic[int(t)] for t in topics]) / (total + 1.0)

    def hot_topics(self, user: int, k: int = 3, now: float | None = None) -> list[int]:
        """Up to ``k`` topics the viewer engaged with most right now (decayed >= a like)."""
        now = time.time() if now is None else now
        with self._lock:
            topics = list(self._topic_keys.get(user, ()))
        scored = [(self.state.value("user_topic_engagements", (user, t), now), t) for t in topics]
        return [t for v, t in sorted(scored, reverse=True)[:k] if v >= HOT_TOPIC_MIN]

    def engaged_posts(self, user: int) -> set[int]:
        with self._lock:
            return set(self._recent.get(user, ()))

    def velocity(self, posts: np.ndarray, now: float | None = None) -> np.ndarray:
        now = time.time() if now is None else now
        return self.state.values("post_engagement_velocity", [(int(p),) for p in posts], now)
