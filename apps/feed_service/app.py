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
from feedrec.serving.rerank import Candidates, rerank

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
        self.fetch = min(3 * cfg.retrieve_k, len(self.index))  # over-fetch: hits get filtered

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _search(self, user_ids: list[int]) -> list[np.ndarray]:
        """Concurrent requests' users in one user-tower pass and one faiss search: [B] -> B x
        [fetch] post ids, nearest first."""
        users = self.transform(self.store.user_raw(np.asarray(user_ids)), "user_tower")
        _, ids = self.index.search(self.encoder.users(users), self.fetch)
        return [row[row >= 0] for row in ids]

    async def candidates(
        self, user_id: int, k: int, blocked: list[int]
    ) -> tuple[list[int], dict[str, int]]:
        """Up to ``k`` allowed post ids for a known user, best first, and how many hits each
        filter removed (followed, seen, hidden, blocked creators)."""
        ids = await self._search(user_id)
        excluded = self.store.exclusions(user_id, ids, np.asarray(blocked, np.int64))
        keep = ~np.logical_or.reduce(list(excluded.values()))
        return [int(p) for p in ids[keep][:k]], {r: int(m.sum()) for r, m in excluded.items()}


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
    """Value model, freshness, creator cap, topic window, small-creator share (see rerank)."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServiceConfig(**config)
        self.store = OnlineFeatureStore.load(
            cfg.data_dir, cfg.world_dir, small_quantile=cfg.small_creator_quantile
        )
        self.rules = cfg.rerank_config()

    def select(
        self, post_ids: list[int], predictions: np.ndarray, count: int, debug: bool
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Feed items (with reasons when ``debug``) and rule -> candidates demoted by it."""
        ids = np.asarray(post_ids, dtype=np.int64)
        candidates = Candidates(
            post_ids=ids,
            predictions=predictions,
            creators=self.store.post_creator(ids),
            topics=self.store.post_topic(ids),
            ages_days=self.store.post_age_days(ids),
            small_creator=self.store.small_creator(ids),
        )
        sel = rerank(candidates, count, self.rules)
        items = [
            {
                "post_id": int(ids[i]),
                "score": float(s),
                "scores": {t: float(v) for t, v in zip(TASKS, predictions[i], strict=True)},
                "reasons": why if debug else None,
            }
            for i, s, why in zip(sel.index, sel.score, sel.reasons, strict=True)
        ]
        return items, sel.demoted


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

    def _popular(self, user_id: int, count: int, blocked: list[int]) -> list[FeedItem]:
        posts = self.store.popular[: count * 20]
        if self.store.knows_user(user_id):
            posts = posts[self.store.allowed(user_id, posts, np.asarray(blocked, np.int64))]
        else:
            blocked_mask = np.isin(self.store.post_creator(posts), blocked)
            posts = posts[~blocked_mask]
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
                items=self._popular(req.user_id, req.count, req.blocked_creator_ids),
                model_version="popularity",
                fallback=False,
                cold_start=True,
            )
        t = self.cfg.timeouts
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            candidates, filtered = await asyncio.wait_for(
                self.retrieval.candidates.remote(
                    req.user_id, self.cfg.retrieve_k, req.blocked_creator_ids
                ),
                t.retrieval_s,
            )
            timings["retrieval_ms"] = (time.perf_counter() - t0) * 1e3
            candidates = candidates[: self.cfg.rank_k]
            t0 = time.perf_counter()
            predictions = await asyncio.wait_for(
                self.ranking.score.remote(req.user_id, candidates), t.ranking_s
            )
            timings["ranking_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            items, demoted = await asyncio.wait_for(
                self.reranking.select.remote(candidates, predictions, req.count, req.debug),
                t.rerank_s,
            )
            timings["rerank_ms"] = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # any stage failure or timeout -> flagged popularity feed
            logger.warning("feed for user %s fell back: %r", req.user_id, e)
            return FeedResponse(
                user_id=req.user_id,
                items=self._popular(req.user_id, req.count, req.blocked_creator_ids),
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
            debug=(
                {"candidates": len(candidates), "filtered": filtered, "demoted": demoted, **timings}
                if req.debug
                else None
            ),
        )


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
    unknown = set(options) - {d.name for d in (Ingress, Retrieval, Ranking, Reranking)}
    if unknown:
        raise ValueError(f"deployments: unknown deployment(s) {sorted(unknown)}")

    def configured(d: Any) -> Any:
        return d.options(**options[d.name]) if d.name in options else d

    return configured(Ingress).bind(
        configured(Retrieval).bind(config),
        configured(Ranking).bind(config),
        configured(Reranking).bind(config),
        config,
    )
