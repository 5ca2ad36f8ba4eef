"""A shadow feed: what a candidate model would have served for a served request."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ShadowFeed:
    """What a shadow (candidate) model would have served for one served request. Logged, never
    shown. A shadow ranker: the same candidates and re-ranking rules, its predictions. A
    shadow retrieval: its candidates, the served ranker's predictions, the same rules.

    Attributes:
        served_model_version, shadow_model_version: labels of the served model and of the
            candidate of the same kind (``ranker-v2`` / ``ranker-v3``, or
            ``retrieval-v1`` / ``retrieval-v2``).
        served: post ids of the served feed, in slot order.
        items: the shadow feed, ``{"post_id", "score", "scores", ...}`` per slot.
        latency_ms: shadow scoring + re-ranking, off the request path.
    """

    request_id: str
    user_id: int
    variant: str
    served_model_version: str
    shadow_model_version: str
    served: list[int]
    items: list[dict[str, Any]]
    latency_ms: float

    @property
    def overlap(self) -> float:
        """Share of the served posts that the shadow feed holds too (1.0 for an empty feed)."""
        shadow = {int(item["post_id"]) for item in self.items}
        return sum(p in shadow for p in self.served) / len(self.served) if self.served else 1.0
