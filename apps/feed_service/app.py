"""The feed service: a Ray Serve application composed with deployment handles.

    Ingress (FastAPI) -> Retrieval (user tower + faiss) -> Ranking (Triton) -> Reranking

Deploy with ``feedrec serve up`` or ``serve deploy apps/feed_service/serve_config.yaml``.
"""

import asyncio
import logging
import time
from typing import Any

import numpy as np
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from feedrec.artifacts import load_artifact
from feedrec.features.transform import FeatureTransform
from feedrec.models.predictor import TowerEncoder
from feedrec.retrieval.build import load_post_index
from feedrec.schema.registry import TASKS
from feedrec.serving.api import FeedItem, FeedRequest, FeedResponse
from feedrec.serving.config import ServiceConfig
from feedrec.serving.online_store import OnlineFeatureStore
from feedrec.serving.ranker_client import TritonRankerClient
from feedrec.serving.rerank import RerankConfig, rerank

logger = logging.getLogger("feedrec.serve")
# Fractional CPUs: the whole chain fits a 2-core laptop; a cluster scales replicas up.
_SMALL = {"num_cpus": 0.25}


@serve.deployment(ray_actor_options=_SMALL)
class Retrieval:
    """User tower on the online features -> faiss top-k -> drop followed creators and seen posts."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServiceConfig(**config)
        self.store = OnlineFeatureStore.load(cfg.data_dir, cfg.world_dir)
        artifact = load_artifact(cfg.retrieval_dir)
        self.encoder = TowerEncoder.from_artifact(artifact)
        self.transform = FeatureTransform(artifact.vocabs)
        self.index = load_post_index(artifact)

    def candidates(self, user_id: int, k: int) -> list[int]:
        """Up to ``k`` allowed post ids for a known user, best first."""
        user = self.transform(self.store.user_raw(np.array([user_id])), "user_tower")
        # Over-fetch: some hits are filtered (followed creators, already seen).
        _, ids = self.index.search(self.encoder.users(user), min(3 * k, len(self.index)))
        ids = ids[0][ids[0] >= 0]
        return [int(p) for p in ids[self.store.allowed(user_id, ids)][:k]]


@serve.deployment(ray_actor_options=_SMALL)
class Ranking:
    """Online features + shared transform -> the ranker in Triton (gRPC) -> [N, 5] predictions."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServiceConfig(**config)
        self.store = OnlineFeatureStore.load(self.cfg.data_dir, self.cfg.world_dir)
        self.transform = FeatureTransform(load_artifact(self.cfg.ranker_dir).vocabs)
        self.client = TritonRankerClient(self.cfg.triton_url, model_name=self.cfg.triton_model)

    async def score(self, user_id: int, post_ids: list[int]) -> np.ndarray:
        raw = self.store.ranker_raw(user_id, np.asarray(post_ids, dtype=np.int64))
        inputs = self.transform(raw, "ranker")
        return await self.client.score(
            inputs.single_ids, inputs.multi_ids, inputs.dense, timeout_s=self.cfg.timeouts.ranking_s
        )


@serve.deployment(ray_actor_options=_SMALL)
class Reranking:
    """Value model + freshness boost + max posts per creator."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServiceConfig(**config)
        self.store = OnlineFeatureStore.load(cfg.data_dir, cfg.world_dir)
        self.rules = RerankConfig(
            freshness_weight=cfg.freshness_weight, max_per_creator=cfg.max_per_creator
        )

    def select(
        self, post_ids: list[int], predictions: np.ndarray, count: int
    ) -> list[dict[str, Any]]:
        ids = np.asarray(post_ids, dtype=np.int64)
        idx, final = rerank(
            ids,
            predictions,
            self.store.post_creator(ids),
            self.store.post_age_days(ids),
            count,
            self.rules,
        )
        return [
            {
                "post_id": int(ids[i]),
                "score": float(s),
                "scores": {t: float(v) for t, v in zip(TASKS, predictions[i], strict=True)},
            }
            for i, s in zip(idx, final, strict=True)
        ]


api = FastAPI(title="feedrec", description="Suggested posts from accounts you don't follow.")


@serve.deployment(ray_actor_options=_SMALL)
@serve.ingress(api)
class Ingress:
    """HTTP front: validation, stage orchestration with deadlines, cold start and fallback."""

    def __init__(
        self,
        retrieval: DeploymentHandle,
        ranking: DeploymentHandle,
        reranking: DeploymentHandle,
        config: dict[str, Any],
    ) -> None:
        self.cfg = ServiceConfig(**config)
        self.retrieval, self.ranking, self.reranking = retrieval, ranking, reranking
        self.store = OnlineFeatureStore.load(self.cfg.data_dir, self.cfg.world_dir)
        self.model_version = load_artifact(self.cfg.ranker_dir).version

    def _popular(self, user_id: int, count: int) -> list[FeedItem]:
        posts = self.store.popular[: count * 20]
        if self.store.knows_user(user_id):
            posts = posts[self.store.allowed(user_id, posts)]
        likes = self.store.tables.post[0, posts[:count], 1]
        return [
            FeedItem(post_id=int(p), score=float(s), scores={})
            for p, s in zip(posts[:count], likes, strict=True)
        ]

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/v1/feed", response_model=FeedResponse)
    async def feed(self, request: FeedRequest) -> FeedResponse:  # type: ignore[valid-type]
        req: Any = request
        started = time.perf_counter()
        if not self.store.knows_user(req.user_id):
            return FeedResponse(
                user_id=req.user_id,
                items=self._popular(req.user_id, req.count),
                model_version="popularity",
                fallback=False,
                cold_start=True,
            )
        t = self.cfg.timeouts
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            candidates = await asyncio.wait_for(
                self.retrieval.candidates.remote(req.user_id, self.cfg.retrieve_k), t.retrieval_s
            )
            timings["retrieval_ms"] = (time.perf_counter() - t0) * 1e3
            candidates = candidates[: self.cfg.rank_k]
            t0 = time.perf_counter()
            predictions = await asyncio.wait_for(
                self.ranking.score.remote(req.user_id, candidates), t.ranking_s
            )
            timings["ranking_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            items = await asyncio.wait_for(
                self.reranking.select.remote(candidates, predictions, req.count), t.rerank_s
            )
            timings["rerank_ms"] = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # any stage failure or timeout -> flagged popularity feed
            logger.warning("feed for user %s fell back: %r", req.user_id, e)
            return FeedResponse(
                user_id=req.user_id,
                items=self._popular(req.user_id, req.count),
                model_version="popularity",
                fallback=True,
                debug={"error": repr(e)} if req.debug else None,
            )
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        return FeedResponse(
            user_id=req.user_id,
            items=[FeedItem(**item) for item in items],
            model_version=self.model_version,
            fallback=False,
            debug={"candidates": len(candidates), **timings} if req.debug else None,
        )


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``serve run apps.feed_service.app:build_app run_dir=...``).

    ``args``: either ``run_dir`` (a pipeline run) or the full ``ServiceConfig`` fields.
    """
    args = dict(args)
    run_dir = args.pop("run_dir", None)
    cfg = ServiceConfig.from_run(run_dir, **args) if run_dir else ServiceConfig(**args)
    config = cfg.model_dump(mode="json")
    return Ingress.bind(
        Retrieval.bind(config), Ranking.bind(config), Reranking.bind(config), config
    )
