"""The online feature store: the serving day's slice of the point-in-time tables.

Two parts, so that where the per-entity features live is a configuration choice:

* the catalog, held by every replica: static entity attributes (creator, topic, content
  embedding, ...), the eligible and popular posts, the per-segment topic like rates;
* a :class:`FeatureSource` of per-entity features: a viewer's :class:`UserFeatures` (window
  statistics, topic history, follows, seen posts, hidden creators) and the statistics of
  candidate posts and their creators. :class:`SnapshotSource` (embedded) holds them in memory;
  ``feedrec.serving.redis_feature_source.RedisFeatureSource`` reads them from a Redis server
  that ``feedrec features publish`` filled.

Either way the raw features are computed by the one join (:meth:`FeatureSnapshot.lookup`) on
a snapshot restricted to the fetched entities, which gives exactly the values of the full one:
a (user, post) pair scored online gets the same raw features as the offline example would.

A request's viewer is fetched once (:meth:`OnlineFeatureStore.user`) and the same
:class:`UserFeatures` is handed to retrieval, ranking and the filters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq

from feedrec.data.preprocess import PreprocessLayout
from feedrec.features.tables import (
    CREATOR_STATS,
    POST_STATS,
    USER_CONTENT_STATS,
    USER_STATS,
    USER_TOPIC_STATS,
    DayStats,
    EntityAttributes,
    FeatureSnapshot,
    FeatureTables,
    SparseStats,
)
from feedrec.serving.rerank import Candidates
from feedrec.world.config import eligible_posts
from feedrec.world.generator import load_world_config
from feedrec.world.layout import WorldLayout


class FeatureStoreError(RuntimeError):
    """The feature source could not answer (e.g. Redis unreachable): the request falls back."""


def _csr(keys: np.ndarray, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys row * n_cols + col -> (indptr [n_rows + 1], cols)."""
    rows, cols = keys // n_cols, keys % n_cols
    return np.searchsorted(rows, np.arange(n_rows + 1)), cols


def _row(indptr: np.ndarray, cols: np.ndarray, row: int) -> np.ndarray:
    if not 0 <= row < len(indptr) - 1:
        return cols[:0]
    return cols[indptr[row] : indptr[row + 1]]


_I64, _F32 = np.dtype("<i8"), np.dtype("<f4")


@dataclass(frozen=True)
class UserFeatures:
    """One viewer's per-entity online features on the serving day.

    Shapes: stats float32 [len(USER_STATS)] (window sums); topics int64 [K] (topics with window
    statistics, ascending); topic_stats float32 [K, len(USER_TOPIC_STATS)]; follows and hidden
    int64 creator ids, seen int64 post ids (each ascending); liked_content float32
    [len(USER_CONTENT_STATS)] (window sum of the liked posts' content embeddings). A user with
    no history has all of them empty / zero.
    """

    user_id: int
    stats: np.ndarray
    topics: np.ndarray
    topic_stats: np.ndarray
    follows: np.ndarray
    seen: np.ndarray
    hidden: np.ndarray
    liked_content: np.ndarray

    @classmethod
    def empty(cls, user_id: int) -> UserFeatures:
        none = np.zeros(0, np.int64)
        return cls(
            user_id,
            np.zeros(len(USER_STATS), np.float32),
            none,
            np.zeros((0, len(USER_TOPIC_STATS)), np.float32),
            none,
            none,
            none,
            np.zeros(len(USER_CONTENT_STATS), np.float32),
        )

    def to_bytes(self) -> bytes:
        """Little-endian: int64 counts [4] (topics, follows, seen, hidden), the int64 id
        arrays in that order, then float32 stats, topic_stats and liked_content."""
        ids = (self.topics, self.follows, self.seen, self.hidden)
        head = np.asarray([len(a) for a in ids], _I64)
        parts = [head, *(np.asarray(a, _I64) for a in ids)]
        parts += [np.asarray(self.stats, _F32), np.asarray(self.topic_stats, _F32)]
        parts.append(np.asarray(self.liked_content, _F32))
        return b"".join(a.tobytes() for a in parts)

    @classmethod
    def from_bytes(cls, user_id: int, blob: bytes) -> UserFeatures:
        n_topics, n_follows, n_seen, n_hidden = np.frombuffer(blob, _I64, 4).tolist()
        at = 32
        ids = []
        for n in (n_topics, n_follows, n_seen, n_hidden):
            ids.append(np.frombuffer(blob, _I64, n, at).astype(np.int64))
            at += 8 * n
        n_stats, n_ut = len(USER_STATS), len(USER_TOPIC_STATS)
        stats = np.frombuffer(blob, _F32, n_stats, at).astype(np.float32)
        at += 4 * n_stats
        n_content = len(USER_CONTENT_STATS)
        if at + 4 * (n_topics * n_ut + n_content) != len(blob):
            raise FeatureStoreError(f"user {user_id}: malformed feature record ({len(blob)} B)")
        topic_stats = np.frombuffer(blob, _F32, n_topics * n_ut, at).reshape(n_topics, n_ut)
        at += topic_stats.nbytes
        content = np.frombuffer(blob, _F32, n_content, at).astype(np.float32)
        topics, follows, seen, hidden = ids
        return cls(
            user_id, stats, topics, topic_stats.astype(np.float32), follows, seen, hidden, content
        )


class FeatureSource(Protocol):
    """Where the per-entity features of the serving day live."""

    def users(self, user_ids: Sequence[int]) -> list[UserFeatures]:
        """The features of ``user_ids`` (known users), in order."""
        ...

    def entity_stats(
        self, post_ids: np.ndarray, creator_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, len(POST_STATS)] of posts [N] and [M, len(CREATOR_STATS)] of creators
        [M] (zeros for entities without statistics), in one round trip."""
        ...


@dataclass(frozen=True)
class SnapshotSource:
    """The embedded source: the full snapshot of the serving day plus CSR rows per user of
    followed creators, seen posts and hidden creators, all in this process."""

    snapshot: FeatureSnapshot
    follows_indptr: np.ndarray
    follows: np.ndarray
    seen_indptr: np.ndarray
    seen: np.ndarray
    hidden_indptr: np.ndarray
    hidden: np.ndarray

    @classmethod
    def load(cls, snapshot: FeatureSnapshot, data_dir: Path, world_dir: Path) -> SnapshotSource:
        data, world = PreprocessLayout(Path(data_dir)), WorldLayout(Path(world_dir))
        attrs = snapshot.attrs
        follows = pq.read_table(world.follows)
        n_creators = attrs.n_creators
        follow_keys = np.sort(
            follows.column("user_id").to_numpy() * n_creators
            + follows.column("creator_id").to_numpy()
        )
        f_ptr, f_cols = _csr(follow_keys, attrs.n_users, n_creators)
        s_ptr, s_cols = _csr(np.load(data.seen, allow_pickle=False), attrs.n_users, attrs.n_posts)
        h_ptr, h_cols = _csr(np.load(data.hidden, allow_pickle=False), attrs.n_users, n_creators)
        return cls(snapshot, f_ptr, f_cols, s_ptr, s_cols, h_ptr, h_cols)

    def users(self, user_ids: Sequence[int]) -> list[UserFeatures]:
        stats = self.snapshot.stats
        t, ut = stats.n_topics, stats.user_topic
        out = []
        for user_id in (int(u) for u in user_ids):
            lo, hi = np.searchsorted(ut.keys, [user_id * t, user_id * t + t])
            out.append(
                UserFeatures(
                    user_id,
                    stats.user.get(np.asarray([user_id]))[0],
                    ut.keys[lo:hi] % t,
                    ut.values[lo:hi],
                    _row(self.follows_indptr, self.follows, user_id),
                    _row(self.seen_indptr, self.seen, user_id),
                    _row(self.hidden_indptr, self.hidden, user_id),
                    stats.user_content.get(np.asarray([user_id]))[0],
                )
            )
        return out

    def entity_stats(
        self, post_ids: np.ndarray, creator_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        stats = self.snapshot.stats
        return stats.post.get(post_ids), stats.creator.get(creator_ids)


def _sparse(keys: np.ndarray, values: np.ndarray) -> SparseStats:
    """Rows of ``keys`` [N] (repeats allowed, same values) -> SparseStats of the unique keys."""
    keys = np.asarray(keys, np.int64)
    unique, first = np.unique(keys, return_index=True)
    return SparseStats(unique, np.asarray(values, np.float32)[first])


@dataclass(frozen=True)
class Catalog:
    """What every replica holds whatever the source: the serving day's aggregates.

    Attributes:
        day: the serving day (features from earlier days only).
        n_topics: topics in the world.
        eligible: int64 [E] posts that may be suggested (created within the post lifetime).
        popular: int64 [E] the eligible posts by likes so far, most liked first.
        popular_likes: float32 [E] their likes.
        segment_topic_rate: float [S + 1, T] smoothed like rate per impression by user segment
            and post topic over the feature window; row S is all users (unknown segment).
        snapshot: names the feature snapshot served (serving day + preprocess run), recorded
            with every served feed so training rows are rebuilt from the same features.
    """

    day: int
    n_topics: int
    eligible: np.ndarray
    popular: np.ndarray
    popular_likes: np.ndarray
    segment_topic_rate: np.ndarray
    snapshot: str

    @classmethod
    def of(cls, snapshot: FeatureSnapshot, lifetime_days: float, name: str) -> Catalog:
        attrs, day = snapshot.attrs, snapshot.day
        eligible = eligible_posts(attrs.post_created_at, day, lifetime_days)
        likes = snapshot.post_stat(eligible, "likes")
        order = np.argsort(-likes, kind="stable")
        # user x topic (imps, likes) -> per segment; +1 like / +20 imps smoothing.
        ut, n_topics = snapshot.stats.user_topic, snapshot.stats.n_topics
        n_seg = int(attrs.user_segment.max()) + 1 if attrs.n_users else 0
        imps = np.zeros((n_seg + 1, n_topics))
        liked = np.zeros_like(imps)
        at = (attrs.user_segment[ut.keys // n_topics], ut.keys % n_topics)
        np.add.at(imps, at, ut.values[:, 0])
        np.add.at(liked, at, ut.values[:, 1])
        imps[n_seg], liked[n_seg] = imps[:n_seg].sum(axis=0), liked[:n_seg].sum(axis=0)
        rate = (liked + 1.0) / (imps + 20.0)
        return cls(day, n_topics, eligible, eligible[order], likes[order], rate, name)


def snapshot_name(data_dir: Path) -> str:
    """The feature snapshot a preprocess output serves: ``day<D>-<hash of its meta>``."""
    data = PreprocessLayout(Path(data_dir))
    day = int(data.read_meta()["serving_day"])
    return f"day{day}-{hashlib.sha256(data.meta.read_bytes()).hexdigest()[:12]}"


@dataclass(frozen=True)
class OnlineFeatureStore:
    """Features of users and posts as of the start of the serving day.

    Attributes:
        attrs: static entity attributes (indexed by raw id).
        catalog: the serving day's aggregates (see :class:`Catalog`).
        source: the per-entity features (embedded or Redis).
        small_creators: bool [C] creators at or below the ``small_quantile`` of followers (the
            ones re-ranking guarantees a share of exposure).
    """

    attrs: EntityAttributes
    catalog: Catalog
    source: FeatureSource
    small_creators: np.ndarray

    @classmethod
    def load(
        cls,
        data_dir: Path,
        world_dir: Path,
        small_quantile: float = 0.25,
        feature_store: str | None = None,
    ) -> OnlineFeatureStore:
        """The store of a preprocess output: embedded (``feature_store`` None) or reading the
        per-entity features from Redis (``redis://host:port/db[?prefix=NAME]``, published by
        ``feedrec features publish`` from the same output)."""
        data = PreprocessLayout(Path(data_dir))
        name = snapshot_name(data_dir)
        source: FeatureSource
        if feature_store is None:
            day = int(data.read_meta()["serving_day"])
            snapshot = FeatureSnapshot.load(data.tables, day)
            lifetime = load_world_config(WorldLayout(Path(world_dir))).post_lifetime_days
            catalog = Catalog.of(snapshot, lifetime, name)
            attrs = snapshot.attrs
            source = SnapshotSource.load(snapshot, data_dir, world_dir)
        else:
            from feedrec.serving.redis_feature_source import RedisFeatureSource

            attrs = FeatureTables.load_attributes(data.tables)
            redis_source = RedisFeatureSource.open(feature_store, name, attrs)
            catalog, source = redis_source.catalog, redis_source
        followers = attrs.creator_followers
        small = followers <= np.quantile(followers, small_quantile)
        return cls(attrs, catalog, source, small)

    @property
    def day(self) -> int:
        return self.catalog.day

    @property
    def now(self) -> float:
        """Request time used for post ages (start of the serving day)."""
        return float(self.catalog.day)

    @property
    def snapshot(self) -> str:
        return self.catalog.snapshot

    @property
    def popular(self) -> np.ndarray:
        return self.catalog.popular

    @property
    def segment_topic_rate(self) -> np.ndarray:
        return self.catalog.segment_topic_rate

    def knows_user(self, user_id: int) -> bool:
        return 0 <= user_id < self.attrs.n_users

    def user(self, user_id: int) -> UserFeatures:
        """A known viewer's features (one fetch; hand the result to every stage)."""
        return self.users([user_id])[0]

    def users(self, user_ids: Sequence[int]) -> list[UserFeatures]:
        """Known users' features, in order. Raises ValueError for an unknown id and
        :class:`FeatureStoreError` when the source cannot answer."""
        ids = np.asarray(user_ids, np.int64)
        self.attrs.check_ids(ids, ids[:0])
        return self.source.users(ids.tolist())

    def _snapshot(
        self, users: Sequence[UserFeatures], post_ids: np.ndarray | None = None
    ) -> FeatureSnapshot:
        """The serving day's snapshot restricted to ``users`` and ``post_ids`` (and their
        creators): the fetched rows only, so the join gives the full snapshot's values."""
        t = self.catalog.n_topics
        users = list({u.user_id: u for u in users}.values())  # a viewer per row repeats
        user_ids = np.asarray([u.user_id for u in users], np.int64)
        stats = np.stack([u.stats for u in users]) if users else np.zeros((0, len(USER_STATS)))
        content = (
            np.stack([u.liked_content for u in users])
            if users
            else np.zeros((0, len(USER_CONTENT_STATS)))
        )
        ut_keys = [u.user_id * t + u.topics for u in users]
        ut_values = [u.topic_stats for u in users]
        posts = np.unique(post_ids) if post_ids is not None else np.zeros(0, np.int64)
        creators = np.unique(self.attrs.post_creator[posts])
        post_stats, creator_stats = (
            self.source.entity_stats(posts, creators)
            if len(posts)
            else (np.zeros((0, len(POST_STATS))), np.zeros((0, len(CREATOR_STATS))))
        )
        day_stats = DayStats(
            day=self.day,
            n_topics=t,
            user=_sparse(user_ids, stats),
            user_topic=_sparse(
                np.concatenate([np.zeros(0, np.int64), *ut_keys]),
                np.concatenate([np.zeros((0, len(USER_TOPIC_STATS))), *ut_values]),
            ),
            user_content=_sparse(user_ids, content),
            post=_sparse(posts, post_stats),
            creator=_sparse(creators, creator_stats),
        )
        return FeatureSnapshot(day_stats, self.attrs)

    def user_raw(self, users: Sequence[UserFeatures]) -> dict[str, np.ndarray]:
        """Raw user-side columns for users [B] (the user tower's inputs)."""
        ids = np.asarray([u.user_id for u in users], np.int64)
        return self._snapshot(users).user_columns(ids, np.full(len(ids), self.day))

    def ranker_raw(
        self, user: UserFeatures | Sequence[UserFeatures], post_ids: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Raw columns for scoring ``post_ids`` [N] for one viewer (or ``user`` [N], a viewer
        per row), at the top of the feed."""
        post_ids = np.asarray(post_ids, np.int64)
        n = len(post_ids)
        if isinstance(user, UserFeatures):
            users, ids = [user], np.full(n, user.user_id, np.int64)
        else:
            users = list(user)
            ids = np.asarray([u.user_id for u in users], np.int64)
        self.attrs.check_ids(ids, post_ids)
        snapshot = self._snapshot(users, post_ids)
        day, now = np.full(n, self.day), np.full(n, self.now)
        return snapshot.lookup(ids, post_ids, day, now, np.zeros(n))

    def exclusions(
        self, user: UserFeatures, post_ids: np.ndarray, blocked_creators: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Why each of ``post_ids`` [N] must not be suggested: reason -> bool [N].

        followed: from a creator the user follows (this is the *suggested* feed); seen: shown
        before; hidden: from a creator one of whose posts the user hid; blocked: from a creator
        in ``blocked_creators`` (the request's block list).
        """
        creators = self.attrs.post_creator[post_ids]
        blocked = np.asarray(blocked_creators if blocked_creators is not None else [], np.int64)
        return {
            "followed": np.isin(creators, user.follows),
            "seen": np.isin(post_ids, user.seen),
            "hidden": np.isin(creators, user.hidden),
            "blocked": np.isin(creators, blocked),
        }

    def allowed(
        self, user: UserFeatures, post_ids: np.ndarray, blocked_creators: np.ndarray | None = None
    ) -> np.ndarray:
        """bool [N]: none of :meth:`exclusions` applies."""
        excluded = self.exclusions(user, post_ids, blocked_creators).values()
        return ~np.logical_or.reduce(list(excluded))

    @property
    def n_segments(self) -> int:
        return len(self.segment_topic_rate) - 1

    def cold_start(
        self, segment: int | None, interests: list[int], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feed candidates for a viewer with no history: (post ids [<= n], scores), best first.

        Score = the post's likes so far (trending) x its topic's like rate in the viewer's
        segment (all users when unknown), doubled for topics in ``interests``.
        Raises ValueError naming the field for an unknown segment or topic.
        """
        n_topics = self.segment_topic_rate.shape[1]
        if segment is not None and not 0 <= segment < self.n_segments:
            raise ValueError(f"user_segment: {segment} is not a segment (0..{self.n_segments - 1})")
        bad = [t for t in interests if not 0 <= t < n_topics]
        if bad:
            raise ValueError(f"interests: {bad} are not topics (0..{n_topics - 1})")
        top = max(20 * n, 500)
        posts, likes = self.popular[:top], self.catalog.popular_likes[:top]
        topics = self.attrs.post_topic[posts]
        row = self.n_segments if segment is None else segment
        score = (1.0 + likes) * self.segment_topic_rate[row, topics]
        score = score * np.where(np.isin(topics, interests), 2.0, 1.0)
        order = np.argsort(-score, kind="stable")[:n]
        return posts[order], score[order]

    def post_topic(self, post_ids: np.ndarray) -> np.ndarray:
        return self.attrs.post_topic[post_ids]

    def small_creator(self, post_ids: np.ndarray) -> np.ndarray:
        """bool [N]: the post's creator is small (see ``small_creators``)."""
        return self.small_creators[self.attrs.post_creator[post_ids]]

    def post_age_days(self, post_ids: np.ndarray) -> np.ndarray:
        return self.now - self.attrs.post_created_at[post_ids]

    def post_creator(self, post_ids: np.ndarray) -> np.ndarray:
        return self.attrs.post_creator[post_ids]

    def candidates(
        self, post_ids: np.ndarray, predictions: np.ndarray, interest: np.ndarray | None = None
    ) -> Candidates:
        """What re-ranking needs of ``post_ids`` [N] with their predictions [N, len(TASKS)]
        and the viewer's real-time topic interest [N] (or None)."""
        return Candidates(
            post_ids=post_ids,
            predictions=predictions,
            creators=self.post_creator(post_ids),
            topics=self.post_topic(post_ids),
            ages_days=self.post_age_days(post_ids),
            small_creator=self.small_creator(post_ids),
            interest=interest,
        )
