"""World size presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np


def eligible_posts(created_at: np.ndarray, day: float, lifetime_days: float) -> np.ndarray:
    """Ids (sorted) of the posts eligible for suggestion on ``day``: created before the day
    starts and at most ``lifetime_days`` earlier. The one rule the logging policy, the index,
    the online catalog, the evaluation corpus and the negative sampler share.

    Args: created_at float [P] creation time in days, indexed by post id.
    """
    return np.flatnonzero((created_at < day) & (created_at >= day - lifetime_days))


@dataclass(frozen=True)
class WorldConfig:
    """Size and shape of a synthetic feed world.

    Args:
        n_users, n_creators, n_posts: entity counts.
        n_days: days of impression logs (day 0 .. n_days-1).
        impressions_per_day: impressions logged per day (sessions x session_len).
        n_topics: post topics; users have Dirichlet interests over them.
        session_len: posts shown per feed session (positions 0 .. session_len-1).
        pool_size: candidates the logging policy samples from per session.
        post_lifetime_days: a post is eligible for suggestions this long after creation.
        new_user_frac: share of users who sign up during the logged days (cold start).
        follows_per_user: mean number of followed creators.
        seed: everything is a deterministic function of the config.
    """

    n_users: int
    n_creators: int
    n_posts: int
    n_days: int
    impressions_per_day: int
    n_topics: int = 16
    session_len: int = 10
    pool_size: int = 300
    post_lifetime_days: float = 7.0
    new_user_frac: float = 0.1
    follows_per_user: float = 8.0
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("n_users", "n_creators", "n_posts", "impressions_per_day", "n_topics")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"world config: {name} must be > 0")
        if self.n_days < 4:
            raise ValueError("world config: n_days must be >= 4 (train, valid and test days)")
        if not 1 <= self.session_len <= self.pool_size:
            raise ValueError("world config: need 1 <= session_len <= pool_size")
        if self.impressions_per_day < self.session_len:
            raise ValueError("world config: impressions_per_day must be >= session_len")
        if not 0.0 <= self.new_user_frac < 1.0:
            raise ValueError("world config: new_user_frac must be in [0, 1)")
        if self.n_creators > self.n_posts:
            raise ValueError("world config: n_creators must be <= n_posts")

    @property
    def sessions_per_day(self) -> int:
        return self.impressions_per_day // self.session_len

    def with_overrides(self, **overrides: Any) -> WorldConfig:
        """A copy with some fields replaced (validated again)."""
        unknown = set(overrides) - set(asdict(self))
        if unknown:
            raise ValueError(f"world config: unknown field(s) {sorted(unknown)}")
        return replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, WorldConfig] = {
    # seconds on a laptop: what tests use
    "debug": WorldConfig(
        n_users=400,
        n_creators=40,
        n_posts=1500,
        n_days=6,
        impressions_per_day=4000,
        n_topics=8,
        pool_size=100,
        follows_per_user=3.0,
    ),
    # the demo: ~1.1M impressions
    "small": WorldConfig(
        n_users=20_000,
        n_creators=1_500,
        n_posts=60_000,
        n_days=14,
        impressions_per_day=80_000,
    ),
    # `small`'s log over 3M posts, 1M of them eligible on the serving day (created in the
    # last post_lifetime_days of a 21-day span): the serving benchmark's 1M-post world
    "posts_1m": WorldConfig(
        n_users=20_000,
        n_creators=1_500,
        n_posts=3_000_000,
        n_days=14,
        impressions_per_day=80_000,
    ),
    # >= 50M impressions, generated day by day
    "large": WorldConfig(
        n_users=2_000_000,
        n_creators=100_000,
        n_posts=5_000_000,
        n_days=30,
        impressions_per_day=1_700_000,
        n_topics=64,
    ),
    # `large`'s log volume over 6M users and 10M posts: >= 10M embedding rows seen in the
    # training days, to check that big tables train on CPU within this machine's memory
    "large_tables": WorldConfig(
        n_users=6_000_000,
        n_creators=100_000,
        n_posts=10_000_000,
        n_days=30,
        impressions_per_day=1_700_000,
        n_topics=64,
    ),
}
