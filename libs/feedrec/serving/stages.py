"""The feed's stages as plain objects, and the orchestration that chains them.

The Ray Serve application (``apps/feed_service/app.py``) hosts each stage in its own deployment
and hands :class:`FeedPipeline` callables that go through deployment handles; the single-process
twin (``bench/serve_twin.py``) hands it the stages' methods directly. Either way the request
path (deadlines, cold start, fallback, debug fields) is this one code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from feedrec.artifacts import load_artifact
from feedrec.artifacts.model_registry import ModelRegistry, RegistryEntry
from feedrec.events.feed_event import new_request_id
from feedrec.features.transform import FeatureTransform
from feedrec.schema.registry import TASKS
from feedrec.serving.api import FeedItem, FeedResponse
from feedrec.serving.config import ServiceConfig
from feedrec.serving.experiment import NO_EXPERIMENT, Variant
from feedrec.serving.exploration import SlateLog
from feedrec.serving.feed_metrics import FeedMetrics
from feedrec.serving.model_watcher import ModelWatcher, NotReady
from feedrec.serving.online_store import OnlineFeatureStore, UserFeatures
from feedrec.serving.ranker_client import TritonRankerClient
from feedrec.serving.realtime_signals import RealtimeSignals
from feedrec.serving.rerank import rerank
from feedrec.serving.shadow_feed import ShadowFeed

logger = logging.getLogger("feedrec.serve")
T = TypeVar("T")


class Retriever:
    """User tower on the online features -> faiss -> filters (followed, seen, hidden, blocked)."""

    def __init__(self, cfg: ServiceConfig, store: OnlineFeatureStore, label: str = "") -> None:
        # Imported here, not with this module: torch, TorchRec and faiss are the Retrieval
        # replicas' alone; an Ingress replica (ranker in Triton) then starts without them,
        # ~3 s of CPU and ~300 MB of RSS less.
        from feedrec.models.predictor import TowerEncoder
        from feedrec.retrieval.build import load_post_index

        self.store = store
        artifact = load_artifact(cfg.retrieval_dir)
        self.label = label or artifact.version
        self.encoder = TowerEncoder.from_artifact(artifact)
        self.transform = FeatureTransform(artifact.vocabs)
        self.index = load_post_index(artifact)
        self.fetch = min(3 * cfg.retrieve_k, len(self.index))  # over-fetch: hits get filtered

    def search(self, users: list[UserFeatures]) -> list[np.ndarray]:
        """[B] viewers -> B x [fetch] post ids, nearest first (one tower pass, one faiss call)."""
        inputs = self.transform(self.store.user_raw(users), "user_tower")
        _, ids = self.index.search(self.encoder.users(inputs), self.fetch)
        return [row[row >= 0] for row in ids]

    def allowed(
        self, user: UserFeatures, hits: np.ndarray, k: int, blocked: list[int]
    ) -> tuple[list[int], dict[str, int]]:
        """The first ``k`` allowed ``hits`` and how many each filter removed."""
        excluded = self.store.exclusions(user, hits, np.asarray(blocked, np.int64))
        keep = ~np.logical_or.reduce(list(excluded.values()))
        return [int(p) for p in hits[keep][:k]], {r: int(m.sum()) for r, m in excluded.items()}


@dataclass(frozen=True)
class RankerModel:
    """What an Ingress replica needs of one ranker version: its vocabularies (through the
    shared transform), the Triton model version that serves its weights ("" = whichever one
    Triton serves) and the label feed responses report."""

    transform: FeatureTransform
    triton_version: str
    label: str


def _registry_ranker(triton: TritonRankerClient) -> Callable[[RegistryEntry], RankerModel]:
    """Registry entry -> ``RankerModel``, once Triton reports that version ready (the stack
    loads it there); ``NotReady`` until then."""

    def build(entry: RegistryEntry) -> RankerModel:
        if not triton.ready_sync(str(entry.version)):
            raise NotReady(f"Triton has not loaded {entry.label} yet")
        artifact = load_artifact(entry.path, weights=False)
        return RankerModel(FeatureTransform(artifact.vocabs), str(entry.version), entry.label)

    return build


def ranker_models(cfg: ServiceConfig, triton: TritonRankerClient) -> ModelWatcher[RankerModel]:
    """The ranker to score with: fixed (``cfg.ranker_dir``) or following the registry's
    production version."""
    if cfg.registry_dir is None:
        artifact = load_artifact(cfg.ranker_dir, weights=False)  # Triton holds the weights
        return ModelWatcher.fixed(
            RankerModel(FeatureTransform(artifact.vocabs), "", artifact.version)
        )
    registry = ModelRegistry(cfg.registry_dir)
    build = _registry_ranker(triton)
    return ModelWatcher(registry, "ranker", build, poll_s=cfg.registry_poll_s).start()


def shadow_watcher(
    cfg: ServiceConfig, name: str, build: Callable[[RegistryEntry], T | None]
) -> ModelWatcher[T | None]:
    """The registry's shadow version of ``name`` (``ranker``, ``retrieval``) as ``build``
    makes it, loaded by the first poll; None while none is set, and always None without
    shadow traffic (``cfg.shadowing``)."""
    if not cfg.shadowing or cfg.registry_dir is None:
        return ModelWatcher.fixed(None)
    registry = ModelRegistry(cfg.registry_dir)
    return ModelWatcher(registry, name, build, poll_s=cfg.registry_poll_s, pointer="shadow").start()


def shadow_rankers(
    cfg: ServiceConfig, triton: TritonRankerClient
) -> ModelWatcher[RankerModel | None]:
    """The registry's shadow ranker (see ``shadow_watcher``)."""
    return shadow_watcher(cfg, "ranker", _registry_ranker(triton))


def _registry_retriever(
    cfg: ServiceConfig, store: OnlineFeatureStore
) -> Callable[[RegistryEntry], Retriever]:
    """Registry entry -> its ``Retriever`` (towers + index) on ``store``."""

    def build(entry: RegistryEntry) -> Retriever:
        return Retriever(cfg.model_copy(update={"retrieval_dir": entry.path}), store, entry.label)

    return build


def retrievers(cfg: ServiceConfig, store: OnlineFeatureStore) -> ModelWatcher[Retriever]:
    """The retrieval model + index to search with: fixed or following the registry."""
    if cfg.registry_dir is None:
        return ModelWatcher.fixed(Retriever(cfg, store))
    registry = ModelRegistry(cfg.registry_dir)
    build = _registry_retriever(cfg, store)
    return ModelWatcher(registry, "retrieval", build, poll_s=cfg.registry_poll_s).start()


def shadow_retrievers(
    cfg: ServiceConfig, store: OnlineFeatureStore
) -> ModelWatcher[Retriever | None]:
    """The registry's shadow retrieval model + index (see ``shadow_watcher``). Loaded only
    while one is set: a second index in memory."""
    return shadow_watcher(cfg, "retrieval", _registry_retriever(cfg, store))


class Scorer:
    """Online features + the shared transform -> the ranker in Triton (gRPC) -> [N, 5]."""

    def __init__(self, cfg: ServiceConfig, store: OnlineFeatureStore) -> None:
        self.cfg, self.store = cfg, store
        self.client = TritonRankerClient(cfg.triton_url, model_name=cfg.triton_model)
        self.models = ranker_models(cfg, self.client)
        self.shadow = shadow_rankers(cfg, self.client)

    async def score(self, user: UserFeatures, post_ids: list[int]) -> tuple[np.ndarray, str]:
        """[N] candidates -> ([N, len(TASKS)] predictions, label of the ranker version used)."""
        return await self._score(self.models.current, user, post_ids)

    async def shadow_score(
        self, user: UserFeatures, post_ids: list[int]
    ) -> tuple[np.ndarray, str] | None:
        """The registry's shadow ranker on ``post_ids`` like :meth:`score`; None while no
        shadow version is set (or Triton has not loaded it yet)."""
        model = self.shadow.current
        return None if model is None else await self._score(model, user, post_ids)

    async def _score(
        self, model: RankerModel, user: UserFeatures, post_ids: list[int]
    ) -> tuple[np.ndarray, str]:
        # `model` is read once by the caller: vocabularies and weights of the same version.
        # The candidates' statistics: one fetch (one Redis round trip with that store).
        raw = self.store.ranker_raw(user, np.asarray(post_ids, dtype=np.int64))
        inputs = model.transform(raw, "ranker")
        scores = await self.client.score(
            inputs.single_ids,
            inputs.multi_ids,
            inputs.dense,
            timeout_s=self.cfg.timeouts.ranking_s,
            model_version=model.triton_version,
        )
        return scores, model.label


class Reranker:
    """Value model, freshness, creator cap, topic window, small-creator share (see rerank)."""

    def __init__(self, cfg: ServiceConfig, store: OnlineFeatureStore) -> None:
        self.store = store
        self.rules = cfg.rerank_config()

    def select(
        self,
        post_ids: list[int],
        predictions: np.ndarray,
        count: int,
        debug: bool,
        interest: np.ndarray | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """Feed items (with reasons when ``debug``) and rule -> candidates demoted by it;
        ``interest`` [N]: real-time topic interest of the viewer per candidate."""
        ids = np.asarray(post_ids, dtype=np.int64)
        sel = rerank(self.store.candidates(ids, predictions, interest), count, self.rules)
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


class RequestError(ValueError):
    """A request the models cannot serve as asked (HTTP 422 with this message)."""


#: (viewer, k, blocked creators) -> (candidate post ids, hits removed per filter, retrieval
#: label). The viewer's features are fetched once by the pipeline and handed to every stage.
Retrieve = Callable[
    [UserFeatures, int, list[int]], Awaitable[tuple[list[int], dict[str, int], str]]
]
Rank = Callable[[UserFeatures, list[int]], Awaitable[tuple[np.ndarray, str]]]
#: (candidates, predictions, count, debug, real-time interest [N] or None) -> (items, demoted)
Rerank = Callable[[list[int], np.ndarray, int, bool, np.ndarray | None], Awaitable[Any]]


#: (user, candidates) -> the shadow ranker's ([N, len(TASKS)] predictions, label), or None
#: while no shadow version is set.
ShadowRank = Callable[[UserFeatures, list[int]], Awaitable[tuple[np.ndarray, str] | None]]
#: (viewer, k, blocked creators) -> the shadow retrieval's (candidate post ids, label), or None
#: while no shadow version is set.
ShadowRetrieve = Callable[[UserFeatures, int, list[int]], Awaitable[tuple[list[int], str] | None]]


@dataclass
class FeedPipeline:
    """retrieve -> rank -> rerank with per-stage deadlines; unknown users get the cold-start
    feed, and any stage failure or timeout a flagged popularity feed (never an error)."""

    cfg: ServiceConfig
    store: OnlineFeatureStore
    retrieve: Retrieve
    rank: Rank
    rerank: Rerank
    metrics: FeedMetrics | None = None  # Prometheus (Serve replicas); None in plain processes
    realtime: RealtimeSignals | None = None  # followed from the event bus; None: not used
    # Shadow traffic: a ``shadow_share`` of personalised feeds is also ranked by the shadow
    # ranker, and fed from the shadow retrieval's candidates, after the response is built;
    # each resulting feed goes to ``on_shadow``.
    shadow: ShadowRank | None = None
    shadow_retrieve: ShadowRetrieve | None = None
    on_shadow: Callable[[ShadowFeed], Awaitable[None]] | None = None
    _shadow_tasks: set[asyncio.Task[ShadowFeed | None]] = field(default_factory=set)

    def with_realtime(
        self, user: UserFeatures, candidates: list[int], blocked: list[int]
    ) -> list[int]:
        """Retrieved candidates minus posts the viewer just engaged with or hid, plus up to
        ``realtime_candidates`` posts of their hot topics (by engagement velocity, then
        likes), at most ``rank_k`` in all."""
        assert self.realtime is not None
        user_id = user.user_id
        engaged = self.realtime.engaged_posts(user_id)
        kept = [p for p in candidates if p not in engaged]
        topics = self.realtime.hot_topics(user_id)
        n_extra = self.cfg.realtime_candidates
        if not topics or n_extra == 0:
            return kept[: self.cfg.rank_k]
        popular = self.store.popular
        pool = popular[np.isin(self.store.post_topic(popular), topics)]
        pool = pool[self.store.allowed(user, pool, np.asarray(blocked, np.int64))]
        present = set(kept) | engaged
        pool = np.asarray([p for p in pool.tolist() if p not in present], np.int64)
        order = np.argsort(-self.realtime.velocity(pool), kind="stable")  # ties: likes order
        extra = pool[order][:n_extra].tolist()
        return kept[: max(self.cfg.rank_k - len(extra), 0)] + extra

    def _with_realtime_interest(
        self, user: UserFeatures, candidates: list[int], blocked: list[int]
    ) -> tuple[list[int], np.ndarray | None]:
        """Retrieved ``candidates`` -> the ones to rank (with the real-time additions when
        real-time signals are on, at most ``rank_k``) and the viewer's real-time interest in
        each [N] (None without real-time signals)."""
        if self.realtime is None:
            return candidates[: self.cfg.rank_k], None
        candidates = self.with_realtime(user, candidates, blocked)[: self.cfg.rank_k]
        topics = self.store.post_topic(np.asarray(candidates, np.int64))
        return candidates, self.realtime.topic_share(user.user_id, topics)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.outcome(outcome)

    def popular(self, user: UserFeatures | None, count: int, blocked: list[int]) -> list[FeedItem]:
        """The most liked eligible posts the viewer may see (``user`` None: their features
        could not be fetched, so only the request's block list applies)."""
        posts = self.store.popular[: count * 20]
        likes = self.store.catalog.popular_likes[: count * 20]
        blocked_ids = np.asarray(blocked, np.int64)
        if user is not None:
            keep = self.store.allowed(user, posts, blocked_ids)
        else:
            keep = ~np.isin(self.store.post_creator(posts), blocked_ids)
        return [
            FeedItem(post_id=int(p), score=float(s), scores={})
            for p, s in zip(posts[keep][:count], likes[keep][:count], strict=True)
        ]

    def popularity_response(
        self,
        req: Any,
        request_id: str,
        variant: str,
        user: UserFeatures | None,
        failure: Exception | None = None,
    ) -> FeedResponse:
        """The popularity feed: an experiment's baseline arm, or (``failure`` given) the
        flagged fallback after a stage failed."""
        return FeedResponse(
            request_id=request_id,
            variant=variant,
            user_id=req.user_id,
            items=self.popular(user, req.count, req.blocked_creator_ids),
            model_version="popularity",
            fallback=failure is not None,
            debug={"error": repr(failure)} if req.debug and failure is not None else None,
        )

    def variant(self, user_id: int) -> Variant:
        """The experiment variant of a viewer (``control``, policy ``model``, if none runs)."""
        experiment = self.cfg.experiment
        return experiment.assign(user_id) if experiment is not None else NO_EXPERIMENT

    def cold_start(self, req: Any, request_id: str, variant: str) -> FeedResponse:
        """A viewer the models have never seen: trending posts weighted by the like rate of
        their topic in the viewer's segment and by the viewer's picked interests, then the
        same re-ranking rules (creator cap, topic window, small-creator share)."""
        try:
            posts, score = self.store.cold_start(req.user_segment, req.interests, 10 * req.count)
        except ValueError as e:
            raise RequestError(str(e)) from e
        keep = ~np.isin(self.store.post_creator(posts), req.blocked_creator_ids)
        posts, score = posts[keep], score[keep]
        predictions = np.zeros((len(posts), len(TASKS)))
        predictions[:, TASKS.index("like")] = score / max(float(score.max(initial=0.0)), 1e-12)
        candidates = self.store.candidates(posts, predictions)
        sel = rerank(candidates, req.count, self.cfg.rerank_config())
        interests = set(req.interests)
        items = []
        for i, s, why in zip(sel.index, sel.score, sel.reasons, strict=True):
            context = [
                "cold start: trending in segment"
                if req.user_segment is not None
                else "cold start: trending"
            ]
            if int(candidates.topics[i]) in interests:
                context.append("cold start: matches interests")
            items.append(
                FeedItem(
                    post_id=int(posts[i]),
                    score=float(s),
                    scores={},
                    reasons=context + why if req.debug else None,
                )
            )
        return FeedResponse(
            request_id=request_id,
            variant=variant,
            user_id=req.user_id,
            items=items,
            model_version="cold-start",
            fallback=False,
            cold_start=True,
        )

    async def feed(self, req: Any) -> FeedResponse:
        """``req``: a validated ``FeedRequest``. Raises ``RequestError`` for unusable context."""
        started = time.perf_counter()
        request_id = new_request_id()
        variant = self.variant(req.user_id)
        if not self.store.knows_user(req.user_id):
            try:
                response = self.cold_start(req, request_id, variant.name)
            except RequestError:
                self._count("invalid")
                raise
            self._count("cold_start")
            return response
        t = self.cfg.timeouts
        timings: dict[str, float] = {}
        user: UserFeatures | None = None
        try:
            t0 = time.perf_counter()
            user = self.store.user(req.user_id)  # once, for every stage
            timings["features_ms"] = (time.perf_counter() - t0) * 1e3
            if variant.policy == "popularity":  # an experiment's baseline arm, not a failure
                self._count("popularity")
                return self.popularity_response(req, request_id, variant.name, user)
            t0 = time.perf_counter()
            candidates, filtered, retrieval_version = await asyncio.wait_for(
                self.retrieve(user, self.cfg.retrieve_k, req.blocked_creator_ids),
                t.retrieval_s,
            )
            timings["retrieval_ms"] = (time.perf_counter() - t0) * 1e3
            retrieved = len(candidates)
            candidates, interest = self._with_realtime_interest(
                user, candidates, req.blocked_creator_ids
            )
            t0 = time.perf_counter()
            predictions, model_version = await asyncio.wait_for(
                self.rank(user, candidates), t.ranking_s
            )
            timings["ranking_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            exploration = variant.exploration
            pool, demoted = await asyncio.wait_for(
                self.rerank(
                    candidates,
                    predictions,
                    exploration.pool_for(req.count),
                    req.debug,
                    interest,
                ),
                t.rerank_s,
            )
            slate = exploration.slate(request_id, len(pool), req.count)
            items = [pool[i] for i in slate.index.tolist()]
            if slate.explored and req.debug:
                note = f"exploration: drawn at random from the top {slate.pool_size}"
                items = [{**item, "reasons": [note, *item["reasons"]]} for item in items]
            timings["rerank_ms"] = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # any stage failure or timeout -> flagged popularity feed
            logger.warning("feed for user %s fell back: %r", req.user_id, e)
            self._count("fallback")
            return self.popularity_response(req, request_id, variant.name, user, failure=e)
        timings["total_ms"] = (time.perf_counter() - started) * 1e3
        if self.metrics is not None:
            self.metrics.personalised(
                timings,
                retrieved=retrieved,
                ranked=len(candidates),
                filtered=filtered,
                predictions=predictions,
                served_scores=[item["score"] for item in items],
                model_version=model_version,
            )
        response = FeedResponse(
            request_id=request_id,
            variant=variant.name,
            user_id=req.user_id,
            items=[FeedItem(**item) for item in items],
            model_version=model_version,
            fallback=False,
            debug=(
                {
                    "candidates": len(candidates),
                    "filtered": filtered,
                    "demoted": demoted,
                    "retrieval_version": retrieval_version,
                    **({"explored": slate.explored} if exploration.enabled else {}),
                    **timings,
                }
                if req.debug
                else None
            ),
        )
        if self.mirrored(request_id):
            if self.shadow is not None:
                self._start_shadow(self.shadow_feed(req, user, response, candidates, interest))
            if self.shadow_retrieve is not None:
                feed = self.shadow_retrieval_feed(req, user, response, retrieval_version)
                self._start_shadow(feed)
        if exploration.enabled:
            response.with_slate(
                SlateLog(
                    pool=[item["post_id"] for item in pool],
                    propensity=slate.propensity.tolist(),
                    explored=slate.explored,
                )
            )
        return response

    def mirrored(self, request_id: str) -> bool:
        """Whether a request is also ranked in shadow: the ``shadow_share`` of requests whose
        (uniformly random, hex) id falls below it, so the choice can be checked from the logs."""
        return int(request_id[:8], 16) < self.cfg.shadow_share * 16**8

    def _start_shadow(self, feed: Coroutine[Any, Any, ShadowFeed | None]) -> None:
        task = asyncio.get_running_loop().create_task(feed)
        self._shadow_tasks.add(task)  # the event loop keeps only a weak reference
        task.add_done_callback(self._shadow_tasks.discard)

    async def shadow_feed(
        self,
        req: Any,
        user: UserFeatures,
        response: FeedResponse,
        candidates: list[int],
        interest: np.ndarray | None = None,
    ) -> ShadowFeed | None:
        """Rank the served request's ``candidates`` with the shadow ranker and re-rank them to
        ``req.count`` with the same rules, then hand the result to ``on_shadow``. None when no
        shadow version is set or it failed: a shadow never affects what is served, so its
        failures are counted and logged, not raised."""
        assert self.shadow is not None
        shadow, t = self.shadow, self.cfg.timeouts

        async def build() -> tuple[list[dict[str, Any]], str] | None:
            scored = await asyncio.wait_for(shadow(user, candidates), t.ranking_s)
            if scored is None:
                return None
            predictions, label = scored
            items, _ = await asyncio.wait_for(
                self.rerank(candidates, predictions, req.count, False, interest), t.rerank_s
            )
            return items, label

        return await self._shadow("ranker", response, response.model_version, build)

    async def shadow_retrieval_feed(
        self, req: Any, user: UserFeatures, response: FeedResponse, served_retrieval: str
    ) -> ShadowFeed | None:
        """The feed the shadow retrieval's candidates would have made: the same real-time
        additions, the served ranker, the same rules, to ``req.count``; handed to
        ``on_shadow``. None when no shadow version is set or it failed (counted, logged,
        never raised). Costs one more retrieval and one more ranking call for each mirrored
        request. ``served_retrieval``: the label of the retrieval that served it."""
        assert self.shadow_retrieve is not None
        shadow_retrieve, t = self.shadow_retrieve, self.cfg.timeouts
        blocked = req.blocked_creator_ids

        async def build() -> tuple[list[dict[str, Any]], str] | None:
            found = await asyncio.wait_for(
                shadow_retrieve(user, self.cfg.retrieve_k, blocked), t.retrieval_s
            )
            if found is None:
                return None
            candidates, interest = self._with_realtime_interest(user, found[0], blocked)
            predictions, _ = await asyncio.wait_for(self.rank(user, candidates), t.ranking_s)
            items, _ = await asyncio.wait_for(
                self.rerank(candidates, predictions, req.count, False, interest), t.rerank_s
            )
            return items, found[1]

        return await self._shadow("retrieval", response, served_retrieval, build)

    async def _shadow(
        self,
        stage: str,
        response: FeedResponse,
        served_version: str,
        build: Callable[[], Awaitable[tuple[list[dict[str, Any]], str] | None]],
    ) -> ShadowFeed | None:
        """Run one shadow ``stage`` (``build`` -> its feed's items and model label, or None
        while no shadow version is set), time it, count it and hand it to ``on_shadow``."""
        started = time.perf_counter()
        try:
            built = await build()
        except Exception as e:
            logger.warning("shadow %s for request %s failed: %r", stage, response.request_id, e)
            if self.metrics is not None:
                self.metrics.shadow(None, stage)
            return None
        if built is None:
            return None
        items, label = built
        feed = ShadowFeed(
            request_id=response.request_id,
            user_id=response.user_id,
            variant=response.variant,
            served_model_version=served_version,
            shadow_model_version=label,
            served=[item.post_id for item in response.items],
            items=items,
            latency_ms=(time.perf_counter() - started) * 1e3,
        )
        await self._record_shadow(feed, stage)
        return feed

    async def _record_shadow(self, feed: ShadowFeed, stage: str) -> None:
        if self.metrics is not None:
            self.metrics.shadow(feed.overlap, stage)
        if self.on_shadow is not None:
            try:
                await self.on_shadow(feed)
            except Exception as e:
                logger.error("shadow feed %s not recorded: %r", feed.request_id, e)
