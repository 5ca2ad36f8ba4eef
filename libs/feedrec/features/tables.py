"""Point-in-time feature tables and the one join that turns (user, post, time) into raw features.

Everything is sparse: only entities (and user x topic pairs) with logged impressions have
statistics, so memory grows with the logs, not with users x topics x days.

* :class:`FeatureTables` keeps the per-day sums of every logged day (:class:`SparseStats` per
  day and entity kind) and builds the statistics valid on any day from them.
* :class:`FeatureSnapshot` is one day's statistics (optionally only for the users and posts a
  caller will look up) plus the static attributes; its :meth:`~FeatureSnapshot.lookup` is the
  join. The preprocess job (Ray Data, offline) joins each logged day against that day's
  snapshot; the feed service (online) holds the serving day's.

Values for day ``d`` are computed only from days strictly before ``d`` (no leakage): user,
user x topic, liked-content and creator statistics over the trailing ``WINDOW_DAYS`` days, post
statistics over all earlier days.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from feedrec.schema.registry import CONTENT_DIM, HISTORY_LEN, SHOWN_TOPICS_LEN, WINDOW_DAYS

#: Columns of the per-entity daily statistics, in array order.
USER_STATS = ("imps", "likes", "comments", "shares", "hides", "dwell")
POST_STATS = ("imps", "likes", "comments", "shares", "hides", "dwell")
CREATOR_STATS = ("imps", "likes", "hides")
USER_TOPIC_STATS = ("imps", "likes")
#: Per user: the sum of the content embeddings of the posts they liked (a row only for users
#: with a like). Divided by the like count it estimates the user's taste in content space: the
#: "history pooled" input of the user tower, which the user id alone learns from few rows.
USER_CONTENT_STATS = tuple(f"liked_content_{i}" for i in range(CONTENT_DIM))

#: Entity kinds -> their statistics. user_topic keys are ``user_id * n_topics + topic``.
KIND_STATS: dict[str, tuple[str, ...]] = {
    "user": USER_STATS,
    "user_topic": USER_TOPIC_STATS,
    "user_content": USER_CONTENT_STATS,
    "post": POST_STATS,
    "creator": CREATOR_STATS,
}
#: Trailing window (days) of each kind's statistics; None: all earlier days.
KIND_WINDOW: dict[str, int | None] = {
    "user": WINDOW_DAYS,
    "user_topic": WINDOW_DAYS,
    "user_content": WINDOW_DAYS,
    "post": None,
    "creator": WINDOW_DAYS,
}
#: Version of the saved layout (1 was dense [days, entities, stats] arrays; 2 had no
#: user_content kind).
FORMAT = 3
#: The retrieval index is built once per serving day with each post's age at this time of that
#: day (days), so the age the item tower saw is at most half a day off any request's.
INDEX_TIME_OF_DAY = 0.5


def members(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where ``keys`` [N] sit in ``sorted_keys`` [K] (sorted, unique) -> (index [N], found [N])."""
    idx = np.searchsorted(sorted_keys, keys)
    idx = np.minimum(idx, max(len(sorted_keys) - 1, 0))
    found = sorted_keys[idx] == keys if len(sorted_keys) else np.zeros(len(keys), bool)
    return idx, found


def topic_slots(counts: np.ndarray, slots: int) -> np.ndarray:
    """Each row's topics repeated in proportion to ``counts``, as a fixed-length id list.

    Largest-remainder apportionment: topic t gets floor(slots * share_t) slots, and the slots
    left go to the largest remainders (ties to the lower topic id). Mean-pooling the list's
    embeddings then weighs each topic by its share, to within 1 / ``slots``.

    Args:
        counts: float [N, T] non-negative counts per topic.
        slots: list length L.
    Returns:
        int64 [N, L] topic ids in ascending order, -1 padded: all L slots filled for a row with
        any count, none for an all-zero row.
    """
    counts = np.asarray(counts, dtype=np.float64)
    n, t = counts.shape
    total = counts.sum(axis=1, keepdims=True)
    exact = np.divide(counts * slots, total, out=np.zeros_like(counts), where=total > 0)
    alloc = np.floor(exact).astype(np.int64)
    left = np.where(total[:, 0] > 0, slots - alloc.sum(axis=1), 0)
    order = np.argsort(alloc - exact, axis=1, kind="stable")  # largest remainder first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(t), (n, t)), axis=1)
    alloc += rank < left[:, None]
    filled = alloc.sum(axis=1)
    row = np.repeat(np.arange(n), filled)
    at = np.arange(filled.sum()) - np.repeat(np.cumsum(filled) - filled, filled)
    out = np.full((n, slots), -1, np.int64)
    out[row, at] = np.repeat(np.tile(np.arange(t), n), alloc.reshape(-1))
    return out


def by_day(
    day: np.ndarray, join: Callable[[int, np.ndarray], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Columns for rows of several days: ``join(d, rows)`` gives the columns of the rows (int
    indices) of day ``d``; the results are put back in row order. ``day`` [N], N > 0."""
    parts, rows = [], []
    for d in np.unique(day).tolist():
        at = np.flatnonzero(day == d)
        parts.append(join(d, at))
        rows.append(at)
    order = np.argsort(np.concatenate(rows), kind="stable")
    return {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}


@dataclass(frozen=True)
class SparseStats:
    """Statistics of the keys that have any.

    Shapes: keys int64 [K] (sorted, unique), values float32 [K, S].
    """

    keys: np.ndarray
    values: np.ndarray

    @classmethod
    def empty(cls, n_stats: int) -> SparseStats:
        return cls(np.zeros(0, np.int64), np.zeros((0, n_stats), np.float32))

    @classmethod
    def sum_of(cls, keys: np.ndarray, values: np.ndarray, dtype: type = np.float32) -> SparseStats:
        """Sum the rows of repeated keys. ``keys`` [N], ``values`` [N, S] -> values of ``dtype``.

        The sort is stable and sums run in float64 in input order, so a key's sum depends only
        on its own rows (in the order given), not on which other keys are present.
        """
        keys = np.asarray(keys, dtype=np.int64)
        if not len(keys):
            return cls(np.zeros(0, np.int64), np.zeros((0, values.shape[1]), dtype))
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], np.asarray(values, dtype=np.float64)[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        return cls(keys[starts], np.add.reduceat(values, starts, axis=0).astype(dtype))

    @property
    def n_stats(self) -> int:
        return int(self.values.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """float32 [N, S]: the statistics of ``keys`` [N], zeros for keys without any."""
        idx, found = members(self.keys, np.asarray(keys, dtype=np.int64))
        out = np.zeros((len(idx), self.n_stats), np.float32)
        out[found] = self.values[idx[found]]
        return out

    def where(self, keep: np.ndarray) -> SparseStats:
        """Only the rows where ``keep`` (bool [K])."""
        return SparseStats(self.keys[keep], self.values[keep])


@dataclass(frozen=True)
class EntityAttributes:
    """Static entity attributes, indexed by raw id.

    Shapes: user_segment [U]; post_creator, post_topic, post_media, post_created_at [P];
    post_content [P, CONTENT_DIM]; creator_followers [C].
    """

    user_segment: np.ndarray
    post_creator: np.ndarray
    post_topic: np.ndarray
    post_media: np.ndarray
    post_created_at: np.ndarray
    post_content: np.ndarray
    creator_followers: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_segment)

    @property
    def n_posts(self) -> int:
        return len(self.post_creator)

    @property
    def n_creators(self) -> int:
        return len(self.creator_followers)

    def post_side(self) -> EntityAttributes:
        """A copy holding the post arrays only (no user or creator rows): all item-side lookups
        (:meth:`post_columns`) need, at a fraction of the bytes on the large worlds."""
        return replace(
            self,
            user_segment=np.zeros(0, self.user_segment.dtype),
            creator_followers=np.zeros(0, self.creator_followers.dtype),
        )

    def post_columns(
        self, post_id: np.ndarray, at: np.ndarray | float | None = None
    ) -> dict[str, np.ndarray]:
        """Raw item-side columns of posts [N]: the static attributes and, given the time ``at``
        (days; [N] or a scalar), each post's age ``p_age_days`` then (what the item tower needs).
        """
        out = {
            "post_id": post_id.astype(np.int64),
            "creator_id": self.post_creator[post_id].astype(np.int64),
            "topic": self.post_topic[post_id].astype(np.int64),
            "media_type": self.post_media[post_id].astype(np.int64),
            "content_emb": self.post_content[post_id].astype(np.float32),
        }
        if at is not None:
            age = np.asarray(at, dtype=np.float64) - self.post_created_at[post_id]
            out["p_age_days"] = np.broadcast_to(age, post_id.shape).astype(np.float32)
        return out

    def check_ids(self, user_id: np.ndarray, post_id: np.ndarray) -> None:
        if user_id.size and (user_id.min() < 0 or user_id.max() >= self.n_users):
            raise ValueError("unknown user_id in feature lookup")
        if post_id.size and (post_id.min() < 0 or post_id.max() >= self.n_posts):
            raise ValueError("unknown post_id in feature lookup")


@dataclass(frozen=True)
class DayStats:
    """The statistics valid on ``day`` (from earlier days only), per entity kind.

    Small enough to ship to Ray Data workers without the attributes (which every day shares).
    """

    day: int
    n_topics: int
    user: SparseStats
    user_topic: SparseStats
    user_content: SparseStats
    post: SparseStats
    creator: SparseStats

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in KIND_STATS)


@dataclass(frozen=True)
class FeatureSnapshot:
    """One day's statistics with the entity attributes: the join for impressions of that day."""

    stats: DayStats
    attrs: EntityAttributes

    @property
    def day(self) -> int:
        return self.stats.day

    @classmethod
    def load(cls, path: Path, day: int) -> FeatureSnapshot:
        """The full snapshot of ``day`` from saved tables (what a store serving that day holds)."""
        return FeatureTables.load(path).snapshot(day)

    def post_stat(self, post_id: np.ndarray, name: str) -> np.ndarray:
        """float32 [N]: statistic ``name`` (one of ``POST_STATS``) of posts [N] on this day."""
        return self.stats.post.get(post_id)[:, POST_STATS.index(name)]

    def topic_likes(self, user_id: np.ndarray) -> np.ndarray:
        """float32 [N, T, 2]: each user's (imps, likes) per topic in the window."""
        t = self.stats.n_topics
        ut = self.stats.user_topic
        user_id = np.asarray(user_id, dtype=np.int64)
        out = np.zeros((len(user_id), t, ut.n_stats), np.float32)
        lo = np.searchsorted(ut.keys, user_id * t)
        hi = np.searchsorted(ut.keys, user_id * t + t)
        counts = hi - lo
        rows = np.repeat(np.arange(len(user_id)), counts)
        at = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        src = np.repeat(lo, counts) + at
        out[rows, ut.keys[src] % t] = ut.values[src]
        return out

    def user_columns(self, user_id: np.ndarray, day: np.ndarray) -> dict[str, np.ndarray]:
        """Raw user-side columns for aligned user ids [N] and days [N] (all this snapshot's)."""
        user_id = np.asarray(user_id, dtype=np.int64)
        self._check_day(day)
        stats = self.stats.user.get(user_id)
        by_topic = self.topic_likes(user_id)  # [N, T, (imps, likes)]
        likes_by_topic = by_topic[:, :, 1]
        # Topics the user liked most in the window (stable order on ties), -1 padded.
        order = np.argsort(-likes_by_topic, axis=1, kind="stable")[:, :HISTORY_LEN]
        top_likes = np.take_along_axis(likes_by_topic, order, axis=1)
        recent = np.where(top_likes > 0, order, -1).astype(np.int64)
        if recent.shape[1] < HISTORY_LEN:
            pad = np.full((len(recent), HISTORY_LEN - recent.shape[1]), -1, dtype=np.int64)
            recent = np.concatenate([recent, pad], axis=1)
        out = {"user_id": user_id}
        out["user_segment"] = self.attrs.user_segment[user_id].astype(np.int64)
        out.update({f"u_{name}": stats[:, i] for i, name in enumerate(USER_STATS)})
        out["u_recent_topics"] = recent
        out["u_shown_topics"] = topic_slots(by_topic[:, :, 0], SHOWN_TOPICS_LEN)
        out["u_liked_content"] = self.stats.user_content.get(user_id)
        return out

    def lookup(
        self,
        user_id: np.ndarray,
        post_id: np.ndarray,
        day: np.ndarray,
        ts: np.ndarray,
        position: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Raw columns (see ``RAW_COLUMNS``) for aligned arrays of length N.

        Args:
            user_id, post_id: int64 [N] raw ids (must be known entities).
            day: int64 [N] day whose snapshot applies (the impression's day; this one's).
            ts: float64 [N] impression time in days (for the post's age).
            position: [N] feed position (serving passes 0).
        """
        user_id = np.asarray(user_id, dtype=np.int64)
        post_id = np.asarray(post_id, dtype=np.int64)
        self.attrs.check_ids(user_id, post_id)
        out = self.user_columns(user_id, day)
        out.update(self.attrs.post_columns(post_id, at=ts))
        topic = out["topic"]
        ut = self.stats.user_topic.get(user_id * self.stats.n_topics + topic)
        out["ut_imps"], out["ut_likes"] = ut[:, 0], ut[:, 1]
        post = self.stats.post.get(post_id)
        out.update({f"p_{name}": post[:, i] for i, name in enumerate(POST_STATS)})
        creator = self.stats.creator.get(out["creator_id"])
        out.update({f"c_{name}": creator[:, i] for i, name in enumerate(CREATOR_STATS)})
        out["c_followers"] = self.attrs.creator_followers[out["creator_id"]].astype(np.float32)
        out["position"] = np.asarray(position, dtype=np.float32)
        return out

    def _check_day(self, day: np.ndarray) -> None:
        day = np.asarray(day, dtype=np.int64)
        if day.size and (day.min() != self.day or day.max() != self.day):
            raise ValueError(f"day outside the feature snapshot (it holds day {self.day})")


@dataclass(frozen=True)
class FeatureTables:
    """Per-day sums of every logged day, sparse, and the snapshots built from them.

    ``daily[kind][d]`` holds the sums of day ``d`` (``d`` in ``0 .. n_days - 1``); snapshots
    exist for days ``0 .. n_days`` (the last is the serving day).
    """

    attrs: EntityAttributes
    n_topics: int
    daily: dict[str, tuple[SparseStats, ...]]

    def __post_init__(self) -> None:
        if set(self.daily) != set(KIND_STATS):
            raise ValueError(f"feature tables: daily sums must have kinds {sorted(KIND_STATS)}")
        if len({len(v) for v in self.daily.values()}) != 1:
            raise ValueError("feature tables: every kind needs the same number of days")

    @property
    def n_days(self) -> int:
        """Logged days."""
        return len(self.daily["user"])

    @property
    def days(self) -> range:
        """Days that have a snapshot (the logged days and the serving day after them)."""
        return range(self.n_days + 1)

    def snapshot(
        self, day: int, users: np.ndarray | None = None, posts: np.ndarray | None = None
    ) -> FeatureSnapshot:
        """Statistics valid on ``day``, optionally only for ``users`` / ``posts`` (int64, sorted
        unique; the creators are those of the posts). A restricted snapshot gives exactly the
        values of the full one for the entities it keeps."""
        return FeatureSnapshot(self.day_stats(day, users, posts), self.attrs)

    def day_stats(
        self, day: int, users: np.ndarray | None = None, posts: np.ndarray | None = None
    ) -> DayStats:
        """The statistics part of :meth:`snapshot`."""
        if day not in self.days:
            raise ValueError(f"no feature snapshot for day {day} (have {self.days})")
        t = self.n_topics
        creators = None if posts is None else np.unique(self.attrs.post_creator[posts])
        # user x topic rows belong to their user (keys // n_topics)
        keep = {
            "user": users,
            "user_topic": users,
            "user_content": users,
            "post": posts,
            "creator": creators,
        }
        stats = {}
        for kind, window in KIND_WINDOW.items():
            first = 0 if window is None else max(0, day - window)
            parts = []
            for d in range(first, day):
                part = self.daily[kind][d]
                only = keep[kind]
                if only is not None:
                    owner = part.keys // t if kind == "user_topic" else part.keys
                    part = part.where(members(only, owner)[1])
                parts.append(part)
            if not parts:
                stats[kind] = SparseStats.empty(len(KIND_STATS[kind]))
                continue
            stats[kind] = SparseStats.sum_of(
                np.concatenate([p.keys for p in parts]), np.concatenate([p.values for p in parts])
            )
        return DayStats(day=day, n_topics=t, **stats)

    def lookup(
        self,
        user_id: np.ndarray,
        post_id: np.ndarray,
        day: np.ndarray,
        ts: np.ndarray,
        position: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """:meth:`FeatureSnapshot.lookup` for rows of any days (arrays [N]): each day's rows
        are joined against that day's snapshot, restricted to their users and posts."""
        user_id = np.asarray(user_id, dtype=np.int64)
        post_id = np.asarray(post_id, dtype=np.int64)
        day = np.asarray(day, dtype=np.int64)
        self.attrs.check_ids(user_id, post_id)
        if not len(day):
            return self.snapshot(0).lookup(user_id, post_id, day, ts, position)
        ts, position = np.asarray(ts), np.asarray(position)

        def one_day(d: int, at: np.ndarray) -> dict[str, np.ndarray]:
            users, posts = user_id[at], post_id[at]
            snap = self.snapshot(d, np.unique(users), np.unique(posts))
            return snap.lookup(users, posts, day[at], ts[at], position[at])

        return by_day(day, one_day)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"attr_{f.name}": getattr(self.attrs, f.name) for f in fields(self.attrs)}
        arrays["format"] = np.asarray(FORMAT)
        arrays["n_topics"] = np.asarray(self.n_topics)
        for kind, days in self.daily.items():
            arrays[f"{kind}_offsets"] = np.cumsum([0] + [len(p.keys) for p in days])
            arrays[f"{kind}_keys"] = np.concatenate([p.keys for p in days])
            arrays[f"{kind}_values"] = np.concatenate([p.values for p in days])
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> FeatureTables:
        attrs = cls.load_attributes(path)
        with np.load(path, allow_pickle=False) as z:
            daily = {}
            for kind in KIND_STATS:
                offsets, keys, values = (z[f"{kind}_{a}"] for a in ("offsets", "keys", "values"))
                daily[kind] = tuple(
                    SparseStats(keys[a:b], values[a:b]) for a, b in itertools.pairwise(offsets)
                )
            return cls(attrs, int(z["n_topics"]), daily)

    @staticmethod
    def load_attributes(path: Path) -> EntityAttributes:
        """Only the static attributes of saved tables (the daily sums stay on disk)."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or int(z["format"]) != FORMAT:
                raise ValueError(
                    f"{path}: feature tables of an older layout; run `feedrec preprocess` again"
                )
            return EntityAttributes(
                **{f.name: z[f"attr_{f.name}"] for f in fields(EntityAttributes)}
            )

    @classmethod
    def from_dense(
        cls,
        attrs: EntityAttributes,
        *,
        user_daily: np.ndarray,
        user_topic_daily: np.ndarray,
        user_content_daily: np.ndarray,
        post_daily: np.ndarray,
        creator_daily: np.ndarray,
    ) -> FeatureTables:
        """Tables from dense per-day sums (small worlds and tests), e.g. user_daily
        [n_days, U, 6], user_topic_daily [n_days, U, T, 2], user_content_daily
        [n_days, U, CONTENT_DIM]; all-zero rows count as absent."""
        n_topics = user_topic_daily.shape[2]
        dense = {
            "user": user_daily,
            "user_topic": user_topic_daily.reshape(len(user_topic_daily), -1, 2),
            "user_content": user_content_daily,
            "post": post_daily,
            "creator": creator_daily,
        }
        daily = {}
        for kind, a in dense.items():
            days = []
            for day in a:
                keys = np.flatnonzero(np.abs(day).sum(axis=1) > 0)
                days.append(SparseStats(keys.astype(np.int64), day[keys].astype(np.float32)))
            daily[kind] = tuple(days)
        return cls(attrs, n_topics, daily)
