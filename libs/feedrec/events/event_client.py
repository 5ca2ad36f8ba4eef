"""Sending client events to a feed service, as an app would: batched, retried, idempotent."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

#: Statuses worth retrying: the service (or a replica) is restarting or overloaded.
RETRY_STATUSES = frozenset({500, 502, 503, 504})


class EventsRejected(ValueError):
    """The service refused the batch as invalid (4xx): retrying cannot help."""


def send_events(
    client: httpx.Client,
    url: str,
    events: Sequence[dict[str, Any]],
    *,
    deadline_s: float = 120.0,
) -> dict[str, int]:
    """POST ``events`` to ``{url}/v1/events`` until acknowledged; returns the ack
    (``accepted``, ``duplicates``). Connection errors and 5xx are retried with the same batch
    (same idempotency keys, so a batch the service wrote before failing counts once) with
    backoff up to ``deadline_s``; a 4xx raises EventsRejected with the service's reason."""
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    body = {"events": list(events)}
    while True:
        try:
            r = client.post(f"{url}/v1/events", json=body)
            if r.status_code == 200:
                return dict(r.json())
            if r.status_code not in RETRY_STATUSES:
                raise EventsRejected(f"events refused ({r.status_code}): {r.text}")
            problem = f"HTTP {r.status_code}"
        except httpx.TransportError as e:
            problem = repr(e)
        if time.monotonic() + delay > give_up:
            raise TimeoutError(f"events not acknowledged within {deadline_s} s: {problem}")
        time.sleep(delay)
        delay = min(delay * 2, 2.0)
