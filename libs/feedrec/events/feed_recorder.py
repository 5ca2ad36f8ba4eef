"""What the feed service writes to the event bus: every served feed, clients' events, and the
shadow ranker's feeds (shadow traffic).

Writes are blocking (flock + fsync, ~0.3 ms here; or a Redis round trip), so the async callers
run them in a thread.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from feedrec.events.event_bus import EventBus, open_event_bus
from feedrec.events.event_log import EventLog
from feedrec.events.feed_event import (
    EventBatch,
    EventsAck,
    event_record,
    served_record,
    shadow_record,
)
from feedrec.serving.api import FeedResponse
from feedrec.serving.shadow_feed import ShadowFeed

SECONDS_PER_DAY = 86_400.0
#: A feed of a variant that does not explore is deterministic given its inputs: a served post
#: had probability 1 of being in its slot. Exploring variants log their own (``SlateLog``).
DETERMINISTIC_PROPENSITY = 1.0


def world_ts(serving_day: int, unix_s: float) -> float:
    """Live traffic on the world clock: the serving day plus the fraction of the UTC day, so
    live rows land in that day's log partition with a realistic time of day."""
    return serving_day + (unix_s % SECONDS_PER_DAY) / SECONDS_PER_DAY


class FeedRecorder:
    """Records served feeds and client events on the bus at ``bus`` (a directory or a
    ``redis://`` URL: :func:`~feedrec.events.event_bus.open_event_bus`)."""

    def __init__(self, bus: str | Path, *, serving_day: int, snapshot: str) -> None:
        self.log: EventBus = open_event_bus(bus)
        if isinstance(self.log, EventLog):
            self.log.catch_up()  # at replica start, not in its first request
        self.serving_day = serving_day
        self.snapshot = snapshot

    def served_payload(
        self, response: FeedResponse, latency_ms: float, unix_s: float
    ) -> dict[str, Any]:
        slate = response.slate
        propensity = (
            slate.propensity
            if slate is not None
            else [DETERMINISTIC_PROPENSITY] * len(response.items)
        )
        return served_record(
            request_id=response.request_id,
            user_id=response.user_id,
            ts=world_ts(self.serving_day, unix_s),
            received_at=unix_s,
            variant=response.variant,
            model_version=response.model_version,
            snapshot=self.snapshot,
            fallback=response.fallback,
            cold_start=response.cold_start,
            latency_ms=latency_ms,
            items=[
                {
                    "post_id": item.post_id,
                    "position": position,
                    "score": item.score,
                    "scores": item.scores,
                    "propensity": p,
                }
                for position, (item, p) in enumerate(zip(response.items, propensity, strict=True))
            ],
            pool=slate.pool if slate is not None else None,
            explored=slate.explored if slate is not None else False,
        )

    async def served(self, response: FeedResponse, latency_ms: float) -> None:
        payload = self.served_payload(response, latency_ms, time.time())
        await asyncio.to_thread(self.log.append, [payload])

    def shadow_payload(self, feed: ShadowFeed, unix_s: float) -> dict[str, Any]:
        served_at = {post: position for position, post in enumerate(feed.served)}
        return shadow_record(
            request_id=feed.request_id,
            user_id=feed.user_id,
            ts=world_ts(self.serving_day, unix_s),
            received_at=unix_s,
            variant=feed.variant,
            served_model_version=feed.served_model_version,
            shadow_model_version=feed.shadow_model_version,
            latency_ms=feed.latency_ms,
            items=[
                {
                    "post_id": int(item["post_id"]),
                    "position": position,
                    "score": float(item["score"]),
                    "scores": item["scores"],
                    "served_position": served_at.get(int(item["post_id"]), -1),
                }
                for position, item in enumerate(feed.items)
            ],
        )

    async def shadow(self, feed: ShadowFeed) -> None:
        payload = self.shadow_payload(feed, time.time())
        await asyncio.to_thread(self.log.append, [payload])

    async def events(self, batch: EventBatch) -> tuple[EventsAck, tuple[bool, ...]]:
        """Write a batch durably (fsync); returns the acknowledgement and, per event, whether
        it was a duplicate. Raises on a failed write (nothing acknowledged: the client
        retries, and the idempotency keys make that safe)."""
        now = time.time()
        result = await asyncio.to_thread(
            self.log.append, [event_record(e, now) for e in batch.events]
        )
        ack = EventsAck(accepted=result.written, duplicates=len(result.duplicates) - result.written)
        return ack, result.duplicates
