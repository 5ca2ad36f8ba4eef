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
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np

from feedrec.events.event_bus import EventBus
from feedrec.events.feed_event import EVENT, FEEDBACK_TYPES, SERVED, attribution_problem
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


class RealtimeSignals:
    """Streaming state + what the feed asks of it. ``post_topic`` [P] and ``user_segment``
    [U] map ids to the entities the features are keyed by."""

    def __init__(
        self, post_topic: np.ndarray, user_segment: np.ndarray, max_keys: int = 1_000_000
    ) -> None:
        self.state = RealtimeState(REALTIME_FEATURES, max_keys=max_keys)
        self.post_topic = post_topic
        self.user_segment = user_segment
        self._served: OrderedDict[str, tuple[int, list[int], str]] = OrderedDict()
        self._recent: dict[int, deque[int]] = {}
        self._topic_keys: dict[int, set[int]] = {}  # user -> topics with engagement state
        self._lock = threading.Lock()
        self.applied = 0
        self.ignored = 0
        self.next_seq = 0

    # -- the stream --------------------------------------------------------------------------

    def apply(self, record: dict[str, Any]) -> None:
        """One bus record (served feed or client event), in bus order."""
        if record.get("kind") == SERVED:
            posts = [int(item["post_id"]) for item in record["items"]]
            entry = (int(record["user_id"]), posts, str(record["variant"]))
            with self._lock:
                self._served[record["request_id"]] = entry
                while len(self._served) > MAX_SERVED:
                    self._served.popitem(last=False)
            return
        if record.get("kind") != EVENT:
            return
        with self._lock:
            served = self._served.get(record["request_id"])
        post, user = int(record["post_id"]), int(record["user_id"])
        valid = (
            served is not None
            and attribution_problem(*served, record) is None
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

    def follow(
        self,
        bus: EventBus,
        poll_s: float = 0.5,
        stop: threading.Event | None = None,
        replay_s: float = REPLAY_S,
    ) -> threading.Thread:
        """Apply the bus's records of the last ``replay_s`` seconds, then start a daemon
        thread applying its new records every ``poll_s``.

        The backlog is applied here, in the caller's thread (a replica's start): in the
        thread it competed for the GIL with the first requests, which then took up to a
        second on a log of 50 MB (the spike bench's first seconds). What is older than
        ``replay_s`` is not replayed: its decayed weight is negligible (``REPLAY_S``), and an
        event about a feed served that long ago is not attributed by this replica."""
        if replay_s <= 0:
            raise ValueError(f"replay_s must be > 0, got {replay_s}")
        stop = stop or threading.Event()
        if self.next_seq == 0:
            self.next_seq = bus.seq_at(time.time() - replay_s)

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
