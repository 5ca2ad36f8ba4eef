"""Point-in-time feature tables and the one join that turns (user, post, time) into raw features.

The preprocess job (Ray Data, offline) and the feed service (online) both call
:meth:`FeatureTables.lookup`; the service just holds the slice for the serving day. Values for day
``d`` are computed only from days strictly before ``d`` (no leakage): user and creator aggregates
over the trailing ``WINDOW_DAYS`` days, post aggregates over all earlier days.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from feedrec.schema.registry import HISTORY_LEN, WINDOW_DAYS

#: Columns of the per-entity daily statistics, in array order.
USER_STATS = ("imps", "likes", "comments", "shares", "hides", "dwell")
POST_STATS = ("imps", "likes", "comments", "shares", "hides", "dwell")
CREATOR_STATS = ("imps", "likes", "hides")
USER_TOPIC_STATS = ("imps", "likes")


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

    def post_columns(self, post_id: np.ndarray) -> dict[str, np.ndarray]:
        """Static raw columns of posts (the item side; no user or time needed)."""
        return {
            "post_id": post_id.astype(np.int64),
            "creator_id": self.post_creator[post_id].astype(np.int64),
            "topic": self.post_topic[post_id].astype(np.int64),
            "media_type": self.post_media[post_id].astype(np.int64),
            "content_emb": self.post_content[post_id].astype(np.float32),
        }


@dataclass(frozen=True)
class FeatureTables:
    """Per-day point-in-time statistics.

    Shapes (D = number of days held, starting at ``first_day``): user [D, U, 6],
    user_topic [D, U, T, 2], post [D, P, 6], creator [D, C, 3].
    """

    first_day: int
    user: np.ndarray
    user_topic: np.ndarray
    post: np.ndarray
    creator: np.ndarray
    attrs: EntityAttributes

    @classmethod
    def from_daily(
        cls,
        attrs: EntityAttributes,
        *,
        user_daily: np.ndarray,
        user_topic_daily: np.ndarray,
        post_daily: np.ndarray,
        creator_daily: np.ndarray,
    ) -> FeatureTables:
        """Build tables for days 0..n_days (inclusive: the last is the serving day).

        Args:
            *_daily: per-day sums, first axis n_days, e.g. user_daily [n_days, U, 6].
        """
        zero = np.zeros_like

        def prior(daily: np.ndarray, window: int | None) -> np.ndarray:
            cum = np.concatenate([zero(daily[:1]), np.cumsum(daily, axis=0, dtype=np.float64)])
            if window is None:
                return cum.astype(np.float32)
            lagged = np.concatenate([zero(cum[:window]), cum[:-window]])
            return (cum - lagged).astype(np.float32)

        return cls(
            first_day=0,
            user=prior(user_daily, WINDOW_DAYS),
            user_topic=prior(user_topic_daily, WINDOW_DAYS),
            post=prior(post_daily, None),
            creator=prior(creator_daily, WINDOW_DAYS),
            attrs=attrs,
        )

    @property
    def days(self) -> range:
        return range(self.first_day, self.first_day + self.user.shape[0])

    def as_of(self, day: int) -> FeatureTables:
        """Only the statistics valid on ``day`` (what the online store keeps in memory)."""
        if day not in self.days:
            raise ValueError(f"no feature snapshot for day {day} (have {self.days})")
        i = day - self.first_day
        return replace(
            self,
            first_day=day,
            user=self.user[i : i + 1].copy(),
            user_topic=self.user_topic[i : i + 1].copy(),
            post=self.post[i : i + 1].copy(),
            creator=self.creator[i : i + 1].copy(),
        )

    def user_columns(self, user_id: np.ndarray, day: np.ndarray) -> dict[str, np.ndarray]:
        """Raw user-side columns for aligned user ids [N] and days [N]."""
        d = self._day_index(day)
        stats = self.user[d, user_id]
        likes_by_topic = self.user_topic[d, user_id, :, 1]  # [N, T]
        # Topics the user liked most in the window (stable order on ties), -1 padded.
        order = np.argsort(-likes_by_topic, axis=1, kind="stable")[:, :HISTORY_LEN]
        top_likes = np.take_along_axis(likes_by_topic, order, axis=1)
        recent = np.where(top_likes > 0, order, -1).astype(np.int64)
        if recent.shape[1] < HISTORY_LEN:
            pad = np.full((len(recent), HISTORY_LEN - recent.shape[1]), -1, dtype=np.int64)
            recent = np.concatenate([recent, pad], axis=1)
        out = {"user_id": user_id.astype(np.int64)}
        out["user_segment"] = self.attrs.user_segment[user_id].astype(np.int64)
        out.update({f"u_{name}": stats[:, i] for i, name in enumerate(USER_STATS)})
        out["u_recent_topics"] = recent
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
            day: int64 [N] day whose snapshot applies (the impression's day).
            ts: float64 [N] impression time in days (for the post's age).
            position: [N] feed position (serving passes 0).
        """
        user_id = np.asarray(user_id, dtype=np.int64)
        post_id = np.asarray(post_id, dtype=np.int64)
        day = np.asarray(day, dtype=np.int64)
        self._check_ids(user_id, post_id)
        d = self._day_index(day)
        out = self.user_columns(user_id, day)
        out.update(self.attrs.post_columns(post_id))
        topic = out["topic"]
        ut = self.user_topic[d, user_id, topic]
        out["ut_imps"], out["ut_likes"] = ut[:, 0], ut[:, 1]
        post = self.post[d, post_id]
        out.update({f"p_{name}": post[:, i] for i, name in enumerate(POST_STATS)})
        age = np.asarray(ts, dtype=np.float64) - self.attrs.post_created_at[post_id]
        out["p_age_days"] = age.astype(np.float32)
        creator = self.creator[d, out["creator_id"]]
        out.update({f"c_{name}": creator[:, i] for i, name in enumerate(CREATOR_STATS)})
        out["c_followers"] = self.attrs.creator_followers[out["creator_id"]].astype(np.float32)
        out["position"] = np.asarray(position, dtype=np.float32)
        return out

    def _day_index(self, day: np.ndarray) -> np.ndarray:
        d = np.asarray(day, dtype=np.int64) - self.first_day
        if d.size and (d.min() < 0 or d.max() >= self.user.shape[0]):
            raise ValueError(f"day outside the feature snapshot range {self.days}")
        return d

    def _check_ids(self, user_id: np.ndarray, post_id: np.ndarray) -> None:
        if user_id.size and (user_id.min() < 0 or user_id.max() >= self.attrs.n_users):
            raise ValueError("unknown user_id in feature lookup")
        if post_id.size and (post_id.min() < 0 or post_id.max() >= self.attrs.n_posts):
            raise ValueError("unknown post_id in feature lookup")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "attrs"}
        arrays.update({f"attr_{f.name}": getattr(self.attrs, f.name) for f in fields(self.attrs)})
        arrays["first_day"] = np.asarray(self.first_day)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path, *, day: int | None = None) -> FeatureTables:
        """Load tables; with ``day`` keep only that day's snapshot."""
        with np.load(path, allow_pickle=False) as z:
            attrs = EntityAttributes(
                **{f.name: z[f"attr_{f.name}"] for f in fields(EntityAttributes)}
            )
            tables = cls(
                first_day=int(z["first_day"]),
                user=z["user"],
                user_topic=z["user_topic"],
                post=z["post"],
                creator=z["creator"],
                attrs=attrs,
            )
        return tables if day is None else tables.as_of(day)
