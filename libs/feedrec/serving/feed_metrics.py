"""Prometheus metrics of the feed request path, exported through Ray's metrics agent.

Ray prefixes every application metric with ``ray_`` and serves them, with its own and Ray
Serve's (request counts, latencies, replica health per deployment), on each node's metrics
export port. ``apps/feed_service/monitoring/`` holds the Grafana dashboard and the alert rules
that read these names; a test checks that every name they use is exported.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from feedrec.schema.registry import TASKS

#: Every metric this module defines (without Ray's ``ray_`` prefix).
METRIC_NAMES = (
    "feedrec_feed_requests",
    "feedrec_stage_latency_ms",
    "feedrec_candidates",
    "feedrec_filtered",
    "feedrec_prediction_mean",
    "feedrec_served_score",
    "feedrec_model_info",
    "feedrec_events",
    "feedrec_event_log_errors",
    "feedrec_shadow_feeds",
    "feedrec_shadow_overlap",
)
OUTCOMES = ("ok", "fallback", "cold_start", "invalid", "popularity")
STAGES = ("retrieval", "ranking", "rerank", "total")
_LATENCY_MS: list[float] = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000]
_COUNTS: list[float] = [1, 5, 10, 25, 50, 100, 150, 300, 500, 1000, 2000]
_PROBABILITY: list[float] = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]


class FeedMetrics:
    """Counters and histograms for one replica. Construct inside a Ray worker (a Serve
    replica); each call costs a few microseconds, so per-request aggregates are recorded,
    not per-candidate values (5 prediction means, not 5 x 150 predictions)."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "feedrec_feed_requests",
            description="Feed requests by outcome: ok, fallback (popularity after a failure), "
            "cold_start, invalid, popularity (an experiment's popularity arm).",
            tag_keys=("outcome",),
        )
        self.latency = Histogram(
            "feedrec_stage_latency_ms",
            description="Wall time per stage of a personalised feed request (ms).",
            boundaries=_LATENCY_MS,
            tag_keys=("stage",),
        )
        self.candidates = Histogram(
            "feedrec_candidates",
            description="Candidates per request after each stage: retrieved, ranked, served.",
            boundaries=_COUNTS,
            tag_keys=("stage",),
        )
        self.filtered = Counter(
            "feedrec_filtered",
            description="Retrieved posts removed by each filter (followed, seen, hidden, blocked).",
            tag_keys=("reason",),
        )
        self.prediction = Histogram(
            "feedrec_prediction_mean",
            description="Mean ranker prediction per request and task over the ranked candidates "
            "(dwell: log1p seconds is not a probability; it is exported as is).",
            boundaries=_PROBABILITY,
            tag_keys=("task",),
        )
        self.served_score = Histogram(
            "feedrec_served_score",
            description="Value-model score of each served item (after re-ranking).",
            boundaries=_PROBABILITY,
        )
        self.model = Gauge(
            "feedrec_model_info",
            description="1 for the ranker version a replica last answered with.",
            tag_keys=("model_version",),
        )
        self.events = Counter(
            "feedrec_events",
            description="Client events written to the event bus, by type and outcome "
            "(accepted, duplicate: a retried idempotency key).",
            tag_keys=("type", "outcome"),
        )
        self.event_log_errors = Counter(
            "feedrec_event_log_errors",
            description="Writes to the event bus that failed, by record kind (served, event).",
            tag_keys=("kind",),
        )
        self.shadow_feeds = Counter(
            "feedrec_shadow_feeds",
            description="Shadow feeds (a candidate ranker or retrieval on served requests, not "
            "shown) by stage (ranker, retrieval) and outcome: scored, failed.",
            tag_keys=("stage", "outcome"),
        )
        self.shadow_overlap = Histogram(
            "feedrec_shadow_overlap",
            description="Share of a served feed's posts that the shadow model's feed would also "
            "have held (1: the same posts), by stage (ranker, retrieval).",
            boundaries=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
            tag_keys=("stage",),
        )
        self._last_version = ""

    def outcome(self, outcome: str) -> None:
        self.requests.inc(tags={"outcome": outcome})

    def personalised(
        self,
        timings_ms: Mapping[str, float],
        retrieved: int,
        ranked: int,
        filtered: Mapping[str, int],
        predictions: np.ndarray,
        served_scores: list[float],
        model_version: str,
    ) -> None:
        """One successful personalised feed. ``predictions``: [ranked, len(TASKS)]."""
        self.requests.inc(tags={"outcome": "ok"})
        for key, ms in timings_ms.items():
            self.latency.observe(ms, tags={"stage": key.removesuffix("_ms")})
        self.candidates.observe(retrieved, tags={"stage": "retrieved"})
        self.candidates.observe(ranked, tags={"stage": "ranked"})
        self.candidates.observe(len(served_scores), tags={"stage": "served"})
        for reason, n in filtered.items():
            if n:
                self.filtered.inc(n, tags={"reason": reason})
        if len(predictions):
            for task, mean in zip(TASKS, np.asarray(predictions).mean(axis=0), strict=True):
                self.prediction.observe(float(mean), tags={"task": task})
        for score in served_scores:
            self.served_score.observe(score)
        if model_version != self._last_version:
            if self._last_version:
                self.model.set(0, tags={"model_version": self._last_version})
            self.model.set(1, tags={"model_version": model_version})
            self._last_version = model_version

    def shadow(self, overlap: float | None, stage: str) -> None:
        """One shadow feed of ``stage`` (``ranker``, ``retrieval``): its overlap with the
        served feed, or None when it failed."""
        outcome = "failed" if overlap is None else "scored"
        self.shadow_feeds.inc(tags={"stage": stage, "outcome": outcome})
        if overlap is not None:
            self.shadow_overlap.observe(overlap, tags={"stage": stage})
