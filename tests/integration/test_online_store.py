"""The online feature store on its two sources: embedded (in the replica) and Redis (a real
``redis-server``, filled by ``feedrec features publish``). Both must give exactly the full
offline snapshot's features of the serving day, so the train/serve contract holds on either;
Redis failures must be clear errors and a flagged fallback feed, never wrong features.

The Redis cases skip when ``redis-server`` is not installed (CI installs it).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import redis

from feedrec.artifacts import load_artifact
from feedrec.data.preprocess import PreprocessLayout
from feedrec.features.tables import FeatureTables
from feedrec.features.transform import FeatureTransform
from feedrec.models.predictor import RankerPredictor
from feedrec.runtime import RunLayout
from feedrec.serving.api import FeedRequest
from feedrec.serving.config import ServiceConfig
from feedrec.serving.online_store import FeatureStoreError, OnlineFeatureStore
from feedrec.serving.redis_feature_source import RedisFeatureSource
from feedrec.serving.stages import FeedPipeline

if TYPE_CHECKING:
    from conftest import RedisServer  # the shared fixture's type (tests/conftest.py)


def _url(server: RedisServer, prefix: str = "feedrec:features") -> str:
    return f"redis://127.0.0.1:{server.port}/0?prefix={prefix}"


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], name)


def test_redis_and_embedded_stores_give_the_offline_snapshots_features_and_scores(
    trained_run: Path, redis_server: RedisServer
) -> None:
    run = RunLayout(trained_run)
    report = RedisFeatureSource.publish(_url(redis_server), run.data, run.world, progress=False)
    assert report.users > 0 and report.posts > 0 and report.creators > 0
    embedded = OnlineFeatureStore.load(run.data, run.world)
    remote = OnlineFeatureStore.load(run.data, run.world, feature_store=_url(redis_server))
    assert remote.snapshot == embedded.snapshot == report.snapshot
    for name in ("eligible", "popular", "popular_likes", "segment_topic_rate"):
        np.testing.assert_array_equal(
            getattr(remote.catalog, name), getattr(embedded.catalog, name)
        )

    day = embedded.day
    offline = FeatureTables.load(PreprocessLayout(run.data).tables).snapshot(day)
    rng = np.random.default_rng(7)
    n_users, n_posts = embedded.attrs.n_users, embedded.attrs.n_posts
    # Users with history, users without any (no Redis key: zeros), and every kind of post.
    users = [int(u) for u in rng.choice(n_users, 24, replace=False)]
    assert any(remote.user(u).seen.size for u in users)
    posts = np.concatenate([embedded.popular[:100], rng.choice(n_posts, 100)]).astype(np.int64)
    _same(remote.user_raw(remote.users(users)), embedded.user_raw(embedded.users(users)))
    artifact = load_artifact(run.ranker)
    transform, predictor = (
        FeatureTransform(artifact.vocabs),
        RankerPredictor.from_artifact(artifact),
    )
    for user in users[:8]:
        viewer = remote.user(user)
        raw = remote.ranker_raw(viewer, posts)
        _same(raw, embedded.ranker_raw(embedded.user(user), posts))
        n = len(posts)
        expected = offline.lookup(
            np.full(n, user), posts, np.full(n, day), np.full(n, float(day)), np.zeros(n)
        )
        _same(raw, expected)  # the offline join of the serving day, so the train path's too
        np.testing.assert_array_equal(
            predictor.predict(transform(raw, "ranker")),
            predictor.predict(transform(expected, "ranker")),
        )
        blocked = embedded.post_creator(posts[:3])
        for reason, hit in remote.exclusions(viewer, posts, blocked).items():
            np.testing.assert_array_equal(
                hit, embedded.exclusions(embedded.user(user), posts, blocked)[reason], reason
            )
    for segment in (None, 0):
        for a, b in zip(
            remote.cold_start(segment, [1], 20), embedded.cold_start(segment, [1], 20), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="unknown user_id"):
        remote.user(n_users)


def _renamed_copy(data: Path, to: Path) -> Path:
    """The same preprocess output under another snapshot name (its meta hash differs)."""
    shutil.copytree(data, to)
    meta = json.loads((to / "meta.json").read_text())
    (to / "meta.json").write_text(json.dumps({**meta, "note": "another run"}))
    return to


def test_publish_is_idempotent_and_retention_drops_old_snapshots_loudly(
    debug_run: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    run = RunLayout(debug_run)
    url = _url(redis_server)
    admin = redis.Redis(port=redis_server.port)
    first = RedisFeatureSource.publish(url, run.data, run.world, progress=False)
    keys = admin.dbsize()
    again = RedisFeatureSource.publish(url, run.data, run.world, progress=False)
    assert (again.snapshot, again.dropped, admin.dbsize()) == (first.snapshot, (), keys)
    serving = OnlineFeatureStore.load(run.data, run.world, feature_store=url)
    user = 0
    serving.user(user)

    other = _renamed_copy(run.data, tmp_path / "data")
    second = RedisFeatureSource.publish(url, other, run.world, keep=2, progress=False)
    assert second.snapshot != first.snapshot and second.dropped == ()
    serving.user(user)  # the previous snapshot is still served
    third = RedisFeatureSource.publish(url, other, run.world, keep=1, progress=False)
    assert third.dropped == (first.snapshot,)
    assert admin.dbsize() == keys  # only the new snapshot's keys are left
    with pytest.raises(FeatureStoreError, match="feedrec features publish") as info:
        serving.user(user)  # gone: an error, never features of zeros
    assert second.snapshot in str(info.value)
    with pytest.raises(FeatureStoreError, match="not in Redis"):
        OnlineFeatureStore.load(run.data, run.world, feature_store=url)
    # Another prefix on the same server is another store.
    with pytest.raises(FeatureStoreError, match="it has none"):
        OnlineFeatureStore.load(run.data, run.world, feature_store=_url(redis_server, "other"))


def test_a_redis_outage_is_a_clear_error_and_a_flagged_fallback_feed(
    debug_run: Path, redis_server: RedisServer
) -> None:
    run = RunLayout(debug_run)
    url = _url(redis_server)
    RedisFeatureSource.publish(url, run.data, run.world, progress=False)
    store = OnlineFeatureStore.load(run.data, run.world, feature_store=url)
    user = next(u for u in range(store.attrs.n_users) if store.user(u).seen.size)

    async def never(*args: Any) -> Any:
        raise AssertionError("no stage may run without the viewer's features")

    cfg = ServiceConfig.from_run(debug_run, events_dir=None)
    pipeline = FeedPipeline(cfg, store, retrieve=never, rank=never, rerank=never)
    blocked = [int(c) for c in store.post_creator(store.popular[:2])]
    redis_server.kill()
    with pytest.raises(FeatureStoreError, match=str(redis_server.port)):
        store.user(user)
    req = FeedRequest(user_id=user, count=5, blocked_creator_ids=blocked, debug=True)
    response = asyncio.run(pipeline.feed(req))
    assert response.fallback is True and response.model_version == "popularity"
    assert "FeatureStoreError" in response.debug["error"]
    posts = np.array([item.post_id for item in response.items])
    assert len(posts) == 5 and not np.isin(store.post_creator(posts), blocked).any()

    redis_server.start()  # same dir and port: the AOF brings the snapshot back
    assert store.user(user).seen.size > 0  # the same store reconnects by itself
