"""The feed service: a Ray Serve application composed with deployment handles.

    Ingress (FastAPI) -> Retrieval deployment (user tower + faiss) -> ranker in Triton (gRPC)
    -> re-ranking

The Ingress replica assembles the ranker's inputs and calls Triton itself, and re-ranks: a
Serve deployment between it and Triton would only forward the call, and that hop cost 7.5 ms
of CPU a request of the 57.7 ms the whole chain spent (`small` world, 15 req/s, 2026-11-25);
Triton batches concurrent requests (dynamic batching) and scales by instance count.

Shadow traffic: while the registry names a shadow ranker or a shadow retrieval (``feedrec
models shadow VERSION [--model retrieval]``), a ``shadow_share`` of personalised feeds is also
ranked by the shadow ranker, or built again from the shadow retrieval's candidates (which the
Retrieval replicas search), after the response is built; each such feed is written to the event
bus as a ``shadow`` record, never returned.

Deploy with ``feedrec serve up`` or ``serve deploy apps/feed_service/serve_config.yaml``.
"""

import logging
import time
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Header, HTTPException
from ray import serve
from ray.serve.handle import DeploymentHandle

from feedrec.artifacts import ArtifactError
from feedrec.artifacts.model_registry import MODEL_NAMES, ModelRegistry, RegistryError
from feedrec.events.event_log import EventLogError
from feedrec.events.feed_event import EventBatch, EventsAck
from feedrec.runtime.ray_cluster import grpc_handle
from feedrec.serving.admin_auth import AdminAuth, AdminAuthError
from feedrec.serving.api import FeedRequest, FeedResponse, PromoteRequest, ShadowRequest
from feedrec.serving.config import ServiceConfig
from feedrec.serving.feed_metrics import FeedMetrics
from feedrec.serving.feed_service import FeedService
from feedrec.serving.latency_window import LatencyWindow
from feedrec.serving.online_store import OnlineFeatureStore, UserFeatures
from feedrec.serving.request_limits import install_request_limits
from feedrec.serving.stages import (
    RequestError,
    retrievers,
    shadow_retrievers,
    shadow_watcher,
)

# Fractional CPUs: the whole chain fits a 2-core laptop; a cluster scales replicas up. The
# Serve YAML (serve_config.yaml) overrides these and adds autoscaling.
_SMALL = {"num_cpus": 0.25}
ModelName = Literal["ranker", "retrieval"]
logger = logging.getLogger("feedrec.serve")


def _store(cfg: ServiceConfig) -> OnlineFeatureStore:
    return OnlineFeatureStore.load(
        cfg.data_dir,
        cfg.world_dir,
        small_quantile=cfg.small_creator_quantile,
        feature_store=cfg.feature_store,
    )


@serve.deployment(ray_actor_options=_SMALL)
class Retrieval:
    """User tower on the online features -> faiss top-k -> filters (see ``Retriever``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServiceConfig(**config)
        store = _store(cfg)
        # Fixed, or following the registry's production version (swapped in by a thread).
        self.retrievers = retrievers(cfg, store)
        # The registry's shadow version, loaded while one is set, if shadow traffic is on.
        self.shadows = shadow_retrievers(cfg, store)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _search(self, users: list[UserFeatures]) -> list[tuple[np.ndarray, str]]:
        """Concurrent requests' viewers in one user-tower pass and one faiss search."""
        retriever = self.retrievers.current
        return [(hits, retriever.label) for hits in retriever.search(users)]

    async def candidates(
        self, user: UserFeatures, k: int, blocked: list[int]
    ) -> tuple[list[int], dict[str, int], str]:
        """Up to ``k`` allowed post ids, best first, how many hits each filter removed, and
        the label of the retrieval version that found them (``user``: the viewer's features,
        fetched once by the Ingress)."""
        hits, label = await self._search(user)
        return (*self.retrievers.current.allowed(user, hits, k, blocked), label)

    async def shadow_candidates(
        self, user: UserFeatures, k: int, blocked: list[int]
    ) -> tuple[list[int], str] | None:
        """The shadow retrieval's allowed candidates (as :meth:`candidates`) and its label;
        None while no shadow version is set. Not batched: only mirrored requests ask."""
        retriever = self.shadows.current
        if retriever is None:
            return None
        hits = retriever.search([user])[0]
        return retriever.allowed(user, hits, k, blocked)[0], retriever.label


api = FastAPI(title="feedrec", description="Suggested posts from accounts you don't follow.")
install_request_limits(api)  # body size, JSON-only, hostile JSON -> 4xx naming it


@serve.deployment(ray_actor_options=_SMALL)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, then ``FeedPipeline``: retrieval through the Retrieval
    deployment's handle; ranking (inputs assembled here, the model in Triton) and re-ranking
    (cheap, CPU-only) in this replica."""

    def __init__(self, retrieval: DeploymentHandle, config: dict[str, Any]) -> None:
        cfg = ServiceConfig(**config)
        store = _store(cfg)
        # gRPC between replicas, not the options of the process that built the app.
        retrieval = grpc_handle(retrieval)

        async def retrieve(user: UserFeatures, k: int, blocked: list[int]) -> Any:
            return await retrieval.candidates.remote(user, k, blocked)

        # Whether a shadow retrieval is named, read here from the registry (one small file a
        # poll): while none is, mirrored requests cost no call to the Retrieval replicas.
        shadow_retrieval = shadow_watcher(cfg, "retrieval", lambda entry: entry.label)

        async def shadow_retrieve(user: UserFeatures, k: int, blocked: list[int]) -> Any:
            if shadow_retrieval.current is None:
                return None
            return await retrieval.shadow_candidates.remote(user, k, blocked)

        self.metrics = FeedMetrics()
        # This replica's recent feed latencies: the p99 the autoscaling policy holds
        # (feedrec.serving.latency_policy).
        self.latency = LatencyWindow(seconds=10.0)
        # Ranking, re-ranking, recording and real-time signals: the twin builds the same.
        self.service = FeedService(
            cfg, store, retrieve, shadow_retrieve=shadow_retrieve, metrics=self.metrics
        )
        self.recorder = self.service.recorder
        self.admin = AdminAuth.from_file(cfg.admin_token_file)
        self.registry = ModelRegistry(cfg.registry_dir) if cfg.registry_dir else None

    def _admin_registry(self, authorization: str | None) -> ModelRegistry:
        try:
            self.admin.check(authorization)
        except AdminAuthError as e:
            raise HTTPException(status_code=e.status, detail=e.reason) from e
        if self.registry is None:
            raise HTTPException(status_code=409, detail="this service is not serving a registry")
        return self.registry

    @api.get("/admin/models", include_in_schema=False)
    def admin_models(self, authorization: str | None = Header(default=None)) -> list[dict]:
        registry = self._admin_registry(authorization)
        return [
            {
                **entry.to_dict(),
                "production": live,
                "shadow": registry.shadow_version(name) == entry.version,
            }
            for name in MODEL_NAMES
            for entry, live in registry.list(name)
        ]

    @api.post("/admin/models/{name}/promote", include_in_schema=False)
    def admin_promote(
        self,
        name: ModelName,
        body: PromoteRequest,
        authorization: str | None = Header(default=None),
    ) -> dict[str, Any]:
        """Promote through the metric gate; replicas pick it up at their next registry poll."""
        registry = self._admin_registry(authorization)
        try:
            done = registry.promote(name, body.version, force=body.force)
        except (RegistryError, ArtifactError) as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        return asdict(done)

    @api.post("/admin/models/{name}/rollback", include_in_schema=False)
    def admin_rollback(
        self, name: ModelName, authorization: str | None = Header(default=None)
    ) -> dict[str, Any]:
        registry = self._admin_registry(authorization)
        try:
            return asdict(registry.rollback(name))
        except (RegistryError, ArtifactError) as e:
            raise HTTPException(status_code=409, detail=str(e)) from e

    @api.post("/admin/models/{name}/shadow", include_in_schema=False)
    def admin_shadow(
        self,
        name: ModelName,
        body: ShadowRequest,
        authorization: str | None = Header(default=None),
    ) -> dict[str, Any]:
        """Set (or clear) the shadow ranker or retrieval; replicas pick it up at their next
        registry poll."""
        registry = self._admin_registry(authorization)
        try:
            previous = registry.set_shadow(name, body.version)
        except (RegistryError, ArtifactError) as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        return {"name": name, "version": body.version, "previous": previous}

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/feed", response_model=FeedResponse)
    async def feed(self, request: FeedRequest) -> FeedResponse:  # type: ignore[valid-type]
        started = time.perf_counter()
        try:
            response = await self.service.feed(request)
        except RequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        self.latency.add((time.perf_counter() - started) * 1e3)
        return response

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metrics (Serve calls this each metrics interval): the p99 of the
        feeds this replica answered in the last 10 s and how many there were."""
        return self.latency.stats()

    @api.post("/v1/events", response_model=EventsAck)
    async def events(self, batch: EventBatch) -> EventsAck:
        """Client events about served feeds, acknowledged once durable (retry on 503: the
        idempotency keys make a retried batch count once)."""
        if self.recorder is None:
            raise HTTPException(status_code=404, detail="this service records no events")
        try:
            ack, duplicates = await self.recorder.events(batch)
        except (OSError, EventLogError) as e:
            self.metrics.event_log_errors.inc(tags={"kind": "event"})
            logger.error("event batch not written: %r", e)
            raise HTTPException(
                status_code=503, detail="events not written; retry the same batch"
            ) from e
        for event, duplicate in zip(batch.events, duplicates, strict=True):
            outcome = "duplicate" if duplicate else "accepted"
            self.metrics.events.inc(tags={"type": event.type, "outcome": outcome})
        return ack


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``serve run apps.feed_service.app:build_app run_dir=...``).

    ``args``: either ``run_dir`` (a pipeline run) or the full ``ServiceConfig`` fields; plus
    optional ``deployments``: deployment name -> ``.options()`` (autoscaling etc.), which
    ``feedrec serve up`` reads from ``serve_config.yaml`` (``serve deploy`` applies it itself).
    """
    args = dict(args)
    run_dir = args.pop("run_dir", None)
    options: dict[str, dict[str, Any]] = args.pop("deployments", None) or {}
    cfg = ServiceConfig.from_run(run_dir, **args) if run_dir else ServiceConfig(**args)
    config = cfg.model_dump(mode="json")
    unknown = set(options) - {d.name for d in (Ingress, Retrieval)}
    if unknown:
        raise ValueError(f"deployments: unknown deployment(s) {sorted(unknown)}")

    def configured(d: Any) -> Any:
        return d.options(**options[d.name]) if d.name in options else d

    return configured(Ingress).bind(configured(Retrieval).bind(config), config)
