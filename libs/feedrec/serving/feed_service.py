"""The feed request path as one host runs it: the pipeline plus its side effects.

A Serve Ingress replica and the benchmark's one-process twin (``bench/serve_twin.py``) both
build a :class:`FeedService`, handing it only what differs between them: how retrieval is
reached (a deployment handle, or the ``Retriever`` in-process) and the metrics sink. Ranking
(inputs assembled here, the model in Triton), re-ranking, the record of every served feed on
the event bus and the real-time signals that follow that bus are the same objects in both, so
the benchmark compares hosts doing the same work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from feedrec.events.event_log import EventLogError
from feedrec.events.feed_recorder import FeedRecorder
from feedrec.serving.api import FeedResponse
from feedrec.serving.config import ServiceConfig
from feedrec.serving.feed_metrics import FeedMetrics
from feedrec.serving.online_store import OnlineFeatureStore, UserFeatures
from feedrec.serving.realtime_signals import RealtimeSignals
from feedrec.serving.stages import FeedPipeline, Reranker, Scorer

logger = logging.getLogger("feedrec.serve")

#: (viewer, k, blocked creator ids) -> (allowed post ids, filtered counts, retrieval label).
Retrieve = Callable[[UserFeatures, int, list[int]], Awaitable[Any]]


class FeedService:
    """``FeedPipeline`` over ``retrieve``, the Triton scorer and the re-ranker, recording each
    served feed on the configured event bus (``cfg.event_bus_location()``; none: not
    recorded) and, with ``cfg.realtime``, following that bus for hot topics.

    ``shadow_retrieve``: the shadow retrieval's candidates (as ``retrieve``, None while no
    shadow version is set); used only when ``cfg.shadowing``.
    """

    def __init__(
        self,
        cfg: ServiceConfig,
        store: OnlineFeatureStore,
        retrieve: Retrieve,
        *,
        shadow_retrieve: Retrieve | None = None,
        metrics: FeedMetrics | None = None,
    ) -> None:
        reranker = Reranker(cfg, store)
        # The production ranker (and the shadow one) follow the registry in this process.
        scorer = Scorer(cfg, store)

        async def select(
            post_ids: list[int], predictions: Any, count: int, debug: bool, interest: Any
        ) -> Any:
            return reranker.select(post_ids, predictions, count, debug, interest)

        self.metrics = metrics
        self.pipeline = FeedPipeline(
            cfg,
            store,
            retrieve=retrieve,
            rank=scorer.score,
            rerank=select,
            metrics=metrics,
            shadow=scorer.shadow_score if cfg.shadowing else None,
            shadow_retrieve=shadow_retrieve if cfg.shadowing else None,
        )
        bus = cfg.event_bus_location()  # events_bus (e.g. redis://...) or events_dir
        self.recorder = (
            FeedRecorder(bus, serving_day=store.day, snapshot=store.snapshot)
            if bus is not None
            else None
        )
        if self.recorder is not None:
            self.pipeline.on_shadow = self.recorder.shadow
        if self.recorder is not None and cfg.realtime:
            # This process follows the bus it writes to: hot topics and velocities within ~1 s.
            signals = RealtimeSignals(store.attrs.post_topic, store.attrs.user_segment)
            signals.follow(self.recorder.log)
            self.pipeline.realtime = signals

    async def feed(self, request: Any) -> FeedResponse:
        """``request``: a validated ``FeedRequest``. Raises ``RequestError`` (HTTP 422) for
        context the models cannot serve; a feed that could not be recorded still goes out."""
        started = time.perf_counter()
        response = await self.pipeline.feed(request)
        if self.recorder is not None:
            try:  # an unrecorded feed costs training rows, not users
                await self.recorder.served(response, (time.perf_counter() - started) * 1e3)
            except (OSError, EventLogError) as e:
                if self.metrics is not None:
                    self.metrics.event_log_errors.inc(tags={"kind": "served"})
                logger.error("served feed %s not recorded: %r", response.request_id, e)
        return response
