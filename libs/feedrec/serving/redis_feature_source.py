"""The online feature store's per-entity features on a Redis server.

``feedrec features publish --to redis://host:port/db[?prefix=NAME]`` writes the serving day's
features of a preprocess output; Serve replicas configured with ``feature_store`` (the same
URL) read a viewer's record once per request and the candidates' statistics in one round trip.

Keys under ``PREFIX`` (the URL's ``prefix``, default ``feedrec:features``), per snapshot ``S``
(``day<D>-<hash>``: :func:`~feedrec.serving.online_store.snapshot_name`):

    PREFIX:S:u:ID     a user's :class:`~feedrec.serving.online_store.UserFeatures` bytes
                      (absent: the user has no history)
    PREFIX:S:p:ID     a post's statistics, float32 [len(POST_STATS)] (absent: none yet)
    PREFIX:S:c:ID     a creator's statistics, float32 [len(CREATOR_STATS)]
    PREFIX:S:catalog  hash: layout, day, entity counts and the serving day's aggregates
                      (eligible, popular, popular_likes, segment_topic_rate as .npy bytes)
    PREFIX:snapshots  sorted set: snapshot -> publish time (newest ``keep`` are kept)

Why snapshots side by side: a replica serves the snapshot of the preprocess output it was
deployed with (its vocabularies and catalog match it), so publishing the next day's output
must not change what running replicas read. Publishing writes every entity key before the
catalog, so a replica that finds the catalog finds the whole snapshot; every read also checks
the catalog in the same round trip, so a snapshot dropped by retention while replicas still
serve it fails loudly (the fallback feed and a log line), never as silently zero features.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from tqdm import tqdm

from feedrec.features.tables import CREATOR_STATS, POST_STATS, EntityAttributes
from feedrec.runtime.redis_url import RedisUrl
from feedrec.serving.online_store import (
    Catalog,
    FeatureStoreError,
    OnlineFeatureStore,
    SnapshotSource,
    UserFeatures,
    snapshot_name,
)

PARAM, DEFAULT_PREFIX = "prefix", "feedrec:features"
#: Version of the key layout above (1: user records without liked_content).
LAYOUT = 2
_ARRAYS = ("eligible", "popular", "popular_likes", "segment_topic_rate")


def parse_location(url: str) -> RedisUrl:
    """``redis://[user:password@]host[:port][/db][?prefix=NAME]``; ValueError names the bad
    part."""
    return RedisUrl.parse(url, what="feature store", param=PARAM, default=DEFAULT_PREFIX)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _array(blob: bytes) -> np.ndarray:
    return np.load(io.BytesIO(blob), allow_pickle=False)


def _rows(blobs: Sequence[bytes | None], width: int) -> np.ndarray:
    """MGET answers -> float32 [N, width], zeros where a key is absent (one copy, no
    per-row numpy call: this runs for every candidate of every request)."""
    zero = bytes(4 * width)
    joined = b"".join(zero if blob is None else blob for blob in blobs)
    if len(joined) != 4 * width * len(blobs):
        raise FeatureStoreError(f"malformed statistics records (need {4 * width} B each)")
    return np.frombuffer(joined, "<f4").reshape(len(blobs), width).astype(np.float32)


@dataclass(frozen=True)
class PublishReport:
    snapshot: str
    users: int
    posts: int
    creators: int
    seconds: float
    dropped: tuple[str, ...]  # older snapshots removed by retention


class RedisFeatureSource:
    """Reads one snapshot's per-entity features (see the module docstring).

    Open it with :meth:`open`; it raises :class:`FeatureStoreError` on every Redis failure.
    """

    def __init__(self, location: RedisUrl, snapshot: str, *, timeout_s: float = 1.0) -> None:
        self.location, self.snapshot = location, snapshot
        self._client = location.client(
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),  # reads only: one immediate retry is safe
        )
        self._base = f"{location.key}:{snapshot}"
        self._catalog_key = f"{self._base}:catalog"
        self.catalog: Catalog

    def __str__(self) -> str:
        return f"feature store {self.location.show(PARAM)} snapshot {self.snapshot}"

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as e:
            raise FeatureStoreError(f"{self}: {what}: {type(e).__name__}: {e}") from e

    def _missing(self) -> FeatureStoreError:
        with self._errors("list snapshots"):
            have = _names(self._client.zrange(f"{self.location.key}:snapshots", 0, -1))
        return FeatureStoreError(
            f"{self}: not in Redis (it has {have or 'none'}); run `feedrec features publish` "
            "for this service's preprocess output"
        )

    @classmethod
    def open(
        cls, url: str, snapshot: str, attrs: EntityAttributes, *, timeout_s: float = 1.0
    ) -> RedisFeatureSource:
        """The source of ``snapshot`` with its catalog read; raises FeatureStoreError when
        Redis is unreachable or lacks that snapshot, or it does not match ``attrs``."""
        source = cls(parse_location(url), snapshot, timeout_s=timeout_s)
        with source._errors("open"):
            raw = cast(dict[bytes, bytes], source._client.hgetall(source._catalog_key))
        if not raw:
            raise source._missing()
        fields = {k.decode(): v for k, v in raw.items()}
        if int(fields["layout"]) != LAYOUT:
            raise FeatureStoreError(f"{source}: key layout {int(fields['layout'])}, need {LAYOUT}")
        counts = tuple(int(fields[k]) for k in ("n_users", "n_posts", "n_creators"))
        if counts != (attrs.n_users, attrs.n_posts, attrs.n_creators):
            raise FeatureStoreError(
                f"{source}: published for {counts} users/posts/creators, this service's data "
                f"has {(attrs.n_users, attrs.n_posts, attrs.n_creators)}"
            )
        arrays = {k: _array(fields[k]) for k in _ARRAYS}
        source.catalog = Catalog(
            day=int(fields["day"]), n_topics=int(fields["n_topics"]), snapshot=snapshot, **arrays
        )
        return source

    def users(self, user_ids: Sequence[int]) -> list[UserFeatures]:
        with self._errors("read users"):
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(self._catalog_key)
            pipe.mget([f"{self._base}:u:{u}" for u in user_ids])
            present, blobs = pipe.execute()
        if not present:
            raise self._missing()
        return [
            UserFeatures.empty(u) if blob is None else UserFeatures.from_bytes(u, blob)
            for u, blob in zip(user_ids, blobs, strict=True)
        ]

    def entity_stats(
        self, post_ids: np.ndarray, creator_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._errors("read posts"):
            pipe = self._client.pipeline(transaction=False)
            pipe.exists(self._catalog_key)
            pipe.mget([f"{self._base}:p:{p}" for p in post_ids.tolist()] or ["-"])
            pipe.mget([f"{self._base}:c:{c}" for c in creator_ids.tolist()] or ["-"])
            present, posts, creators = pipe.execute()
        if not present:
            raise self._missing()
        posts, creators = posts[: len(post_ids)], creators[: len(creator_ids)]
        return _rows(posts, len(POST_STATS)), _rows(creators, len(CREATOR_STATS))

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def publish(
        url: str,
        data_dir: Path,
        world_dir: Path,
        *,
        keep: int = 2,
        batch: int = 5000,
        progress: bool = True,
    ) -> PublishReport:
        """Write the serving-day features of a preprocess output under its snapshot name,
        then drop all but the newest ``keep`` snapshots. Idempotent (same data, same keys).

        Raises ValueError for a malformed URL or ``keep`` < 1 and FeatureStoreError when
        Redis fails (a snapshot whose catalog was not written is never read)."""
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        location = parse_location(url)
        started = time.perf_counter()
        writer = RedisFeatureSource(location, snapshot_name(data_dir), timeout_s=30.0)
        base, client = writer._base, writer._client
        with writer._errors("connect"):
            client.ping()  # before the tables are read: on `large` that takes half a minute
        store = OnlineFeatureStore.load(data_dir, world_dir)
        source = cast(SnapshotSource, store.source)
        stats, attrs, catalog = source.snapshot.stats, store.attrs, store.catalog
        has_rows = np.diff(source.follows_indptr) + np.diff(source.seen_indptr)
        has_rows = has_rows + np.diff(source.hidden_indptr)
        users = np.union1d(
            np.union1d(stats.user.keys, stats.user_topic.keys // stats.n_topics),
            np.flatnonzero(has_rows > 0),
        )
        bar = tqdm(
            total=len(users) + len(stats.post.keys) + len(stats.creator.keys),
            desc=f"publish {catalog.snapshot}",
            unit="key",
            disable=not progress,
        )
        with writer._errors("publish"):
            client.delete(writer._catalog_key)  # unreadable until every key is back
            for lo in range(0, len(users), batch):
                chunk = users[lo : lo + batch].tolist()
                client.mset({f"{base}:u:{u.user_id}": u.to_bytes() for u in source.users(chunk)})
                bar.update(len(chunk))
            for kind, table in (("p", stats.post), ("c", stats.creator)):
                for lo in range(0, len(table.keys), batch):
                    keys, values = table.keys[lo : lo + batch], table.values[lo : lo + batch]
                    rows = values.astype("<f4")
                    client.mset(
                        {f"{base}:{kind}:{k}": r.tobytes() for k, r in zip(keys, rows, strict=True)}
                    )
                    bar.update(len(keys))
            bar.close()
            fields: dict[str, Any] = {k: _npy(getattr(catalog, k)) for k in _ARRAYS}
            fields |= {"layout": LAYOUT, "day": catalog.day, "n_topics": catalog.n_topics}
            fields |= {"n_users": attrs.n_users, "n_posts": attrs.n_posts}
            fields |= {"n_creators": attrs.n_creators}
            client.hset(writer._catalog_key, mapping=cast(Any, fields))
            index = f"{location.key}:snapshots"
            client.zadd(index, {catalog.snapshot: time.time()})
            old = _names(client.zrange(index, 0, -keep - 1))
            for name in old:
                _drop(client, f"{location.key}:{name}")
                client.zrem(index, name)
        writer.close()
        return PublishReport(
            catalog.snapshot,
            len(users),
            len(stats.post.keys),
            len(stats.creator.keys),
            time.perf_counter() - started,
            tuple(old),
        )


def _names(reply: Any) -> list[str]:
    return [bytes(name).decode() for name in reply]


def _drop(client: redis.Redis, base: str) -> None:
    """Unlink every key of one snapshot (the catalog first, so readers see it gone)."""
    client.unlink(f"{base}:catalog")
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{base}:*", count=10_000):
        batch.append(key)
        if len(batch) >= 10_000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)
