"""What a client reports about a feed it showed (``POST /v1/events``), and what the service
records about each feed it served. Both go to the event bus; the sink joins them into logs.

A client event names the feed response (``request_id``) and the slot (``position``) that showed
the post, so an engagement is attributed to exactly the impression that caused it; the served
record holds what the service knew then (user, post, scores, model version, feature snapshot,
propensity), so training rows are rebuilt from what was served, not from today's features.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from feedrec.events.event_log import KEY_FIELD
from feedrec.serving.api import MAX_COUNT, Id, Integer

#: What a client reports per shown post. ``impression``: the post was on screen; ``view``: the
#: user looked at it (the world's ``view`` label); ``dwell``: seconds spent on it.
EVENT_TYPES = ("impression", "view", "like", "comment", "share", "hide", "dwell")
#: A batch stays under the ingress body limit (64 KiB): ~250 bytes an event.
MAX_EVENTS = 200
#: A day of dwell is not a plausible single view: larger values are client bugs.
MAX_DWELL_S = 86_400.0
REQUEST_ID_PATTERN = r"^[0-9a-f]{32}$"
VARIANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
#: Record kinds on the bus. ``shadow``: a candidate model's feed for a served request, scored
#: and logged but never shown (shadow traffic). ``clock``: no content, only a ``received_at``:
#: bus time moving on while no traffic comes (a following sink writes one when feeds wait for
#: their window to close), so that windows close on the bus, the same on every re-read.
SERVED, EVENT, SHADOW, CLOCK = "served", "event", "shadow", "clock"
#: Event types that are explicit feedback on a post (labels of the logs; the real-time
#: signals remember the posts they were about).
FEEDBACK_TYPES = ("like", "comment", "share", "hide")
#: How long after a feed is served (bus receive time) its events still count: the sink rejects
#: later ones as late, and the real-time signals forget the feed, so both count the same.
ATTRIBUTION_WINDOW_S = 1800.0


def attribution_problem(
    user_id: int, post_ids: list[int], variant: str, event: dict[str, Any]
) -> str | None:
    """Why a client event does not belong to the feed served to ``user_id`` (posts by slot,
    ``variant``), or None when it does. The sink and the real-time signals both count an
    event only when it names a slot that really showed its post to its user."""
    position = int(event["position"])
    if position >= len(post_ids):
        return f"position {position} >= the {len(post_ids)} posts served"
    if int(post_ids[position]) != int(event["post_id"]):
        return f"post {event['post_id']} is not the one served at position {position}"
    if int(user_id) != int(event["user_id"]):
        return f"user {event['user_id']} was not the viewer"
    if variant != event["variant"]:
        return f"variant {event['variant']!r} is not the served {variant!r}"
    return None


def new_request_id() -> str:
    """A feed response's id: 32 lowercase hex digits (uuid4)."""
    return uuid.uuid4().hex


class _Event(BaseModel):
    """Fields every event has."""

    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str = Field(pattern=REQUEST_ID_PATTERN, description="the feed response's id")
    position: Integer = Field(ge=0, lt=MAX_COUNT, description="0-based slot in that response")
    post_id: Id
    user_id: Id
    variant: str = Field(pattern=VARIANT_PATTERN, description="the response's variant")
    idempotency_key: str = Field(
        min_length=8,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="unique per event: a retried event with the same key is counted once",
    )


class InteractionEvent(_Event):
    """A post was shown, looked at, liked, commented on, shared or hidden."""

    type: Literal["impression", "view", "like", "comment", "share", "hide"]


class DwellEvent(_Event):
    """Seconds the user spent on a post."""

    type: Literal["dwell"]
    dwell_s: float = Field(ge=0, le=MAX_DWELL_S, description="seconds on the post")


#: One thing a user did with one post of one served feed. A union tagged by ``type``, so the
#: OpenAPI schema itself says that ``dwell_s`` belongs to (and only to) ``dwell`` events.
FeedEvent = Annotated[InteractionEvent | DwellEvent, Field(discriminator="type")]
_FEED_EVENT: TypeAdapter[InteractionEvent | DwellEvent] = TypeAdapter(FeedEvent)


def feed_event(**fields: Any) -> InteractionEvent | DwellEvent:
    """Validate one event (ValueError naming the field when it is not one)."""
    return _FEED_EVENT.validate_python(fields)


class EventBatch(BaseModel):
    """``POST /v1/events`` body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    events: list[FeedEvent] = Field(min_length=1, max_length=MAX_EVENTS)


class EventsAck(BaseModel):
    """``POST /v1/events`` response: sent only after the events are durable."""

    model_config = ConfigDict(extra="forbid")

    accepted: int = Field(description="events written now")
    duplicates: int = Field(description="events whose idempotency key was already written")


def event_record(event: InteractionEvent | DwellEvent, received_at: float) -> dict[str, Any]:
    """The bus record of a client event (``received_at``: unix seconds at the ingress)."""
    record = event.model_dump()
    # Namespaced, so no client key can collide with (and so suppress) a served record's key.
    record[KEY_FIELD] = f"event:{event.idempotency_key}"
    record["kind"] = EVENT
    record["received_at"] = received_at
    return record


def clock_record(received_at: float) -> dict[str, Any]:
    """The bus record saying that bus time has reached ``received_at`` (unix s)."""
    return {"kind": CLOCK, "received_at": received_at}


def served_record(
    *,
    request_id: str,
    user_id: int,
    ts: float,
    received_at: float,
    variant: str,
    model_version: str,
    snapshot: str,
    fallback: bool,
    cold_start: bool,
    latency_ms: float,
    items: list[dict[str, Any]],
    pool: list[int] | None = None,
    explored: bool = False,
) -> dict[str, Any]:
    """The bus record of a served feed. ``ts``: world-clock days (the log's time axis);
    ``items``: ``{"post_id", "position", "score", "scores", "propensity"}`` per slot; for an
    exploring variant, ``pool``: the post ids the slots were drawn from, in the chain's order,
    and ``explored``: whether the draw was random (``feedrec.serving.exploration``)."""
    return {
        "kind": SERVED,
        KEY_FIELD: f"served:{request_id}",
        "request_id": request_id,
        "user_id": user_id,
        "ts": ts,
        "received_at": received_at,
        "variant": variant,
        "model_version": model_version,
        "snapshot": snapshot,
        "fallback": fallback,
        "cold_start": cold_start,
        "latency_ms": latency_ms,
        "items": items,
        "pool": pool,
        "explored": explored,
    }


def shadow_record(
    *,
    request_id: str,
    user_id: int,
    ts: float,
    received_at: float,
    variant: str,
    served_model_version: str,
    shadow_model_version: str,
    latency_ms: float,
    items: list[dict[str, Any]],
) -> dict[str, Any]:
    """The bus record of a shadow feed: what a candidate model would have served for the
    served request ``request_id``: a shadow ranker on the same candidates, or a shadow
    retrieval's candidates ranked by the served ranker; the same re-ranking rules. ``items``:
    ``{"post_id", "position", "score", "scores", "served_position"}`` per slot, the last the
    post's position in the served feed (-1: not served); ``latency_ms``: of the shadow scoring
    and re-ranking, off the request path."""
    return {
        "kind": SHADOW,
        # One record per shadow model and request: a shadow ranker and a shadow retrieval may
        # both follow the same request.
        KEY_FIELD: f"shadow:{request_id}:{shadow_model_version}",
        "request_id": request_id,
        "user_id": user_id,
        "ts": ts,
        "received_at": received_at,
        "variant": variant,
        "served_model_version": served_model_version,
        "shadow_model_version": shadow_model_version,
        "latency_ms": latency_ms,
        "items": items,
    }
