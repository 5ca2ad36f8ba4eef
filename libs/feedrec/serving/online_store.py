"""The embedded online feature store: the serving day's slice of the point-in-time tables.

It holds exactly what the offline join used for that day (``FeatureTables.as_of``), so a
(user, post) pair scored online gets the same raw features as the offline example would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from feedrec.data.preprocess import PreprocessLayout
from feedrec.features.tables import FeatureTables
from feedrec.world.generator import load_world_config
from feedrec.world.layout import WorldLayout


def _csr(keys: np.ndarray, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys row * n_cols + col -> (indptr [n_rows + 1], cols)."""
    rows, cols = keys // n_cols, keys % n_cols
    return np.searchsorted(rows, np.arange(n_rows + 1)), cols


@dataclass(frozen=True)
class OnlineFeatureStore:
    """Features of users and posts as of ``now`` (days on the world clock).

    Attributes:
        tables: point-in-time tables holding only the serving day.
        now: request time used for post ages (start of the serving day).
        eligible: int64 [E] posts that may be suggested (created within the post lifetime).
        popular: int64 [E] the eligible posts by likes so far, most liked first.
    """

    tables: FeatureTables
    now: float
    eligible: np.ndarray
    popular: np.ndarray
    follows_indptr: np.ndarray
    follows: np.ndarray
    seen_indptr: np.ndarray
    seen: np.ndarray

    @classmethod
    def load(cls, data_dir: Path, world_dir: Path) -> OnlineFeatureStore:
        data, world = PreprocessLayout(Path(data_dir)), WorldLayout(Path(world_dir))
        day = int(data.read_meta()["serving_day"])
        tables = FeatureTables.load(data.tables, day=day)
        attrs = tables.attrs
        lifetime = load_world_config(world).post_lifetime_days
        created = attrs.post_created_at
        eligible = np.flatnonzero((created < day) & (created >= day - lifetime))
        likes = tables.post[0, eligible, 1]
        popular = eligible[np.argsort(-likes, kind="stable")]
        follows = pq.read_table(world.follows)
        follow_keys = np.sort(
            follows.column("user_id").to_numpy() * len(attrs.creator_followers)
            + follows.column("creator_id").to_numpy()
        )
        f_ptr, f_cols = _csr(follow_keys, attrs.n_users, len(attrs.creator_followers))
        s_ptr, s_cols = _csr(np.load(data.seen), attrs.n_users, attrs.n_posts)
        return cls(tables, float(day), eligible, popular, f_ptr, f_cols, s_ptr, s_cols)

    @property
    def day(self) -> int:
        return self.tables.first_day

    def knows_user(self, user_id: int) -> bool:
        return 0 <= user_id < self.tables.attrs.n_users

    def user_raw(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Raw user-side columns for users [B] (the user tower's inputs)."""
        return self.tables.user_columns(user_ids, np.full(len(user_ids), self.day))

    def ranker_raw(self, user_id: int, post_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Raw columns for scoring ``post_ids`` [N] for one user, at the top of the feed."""
        n = len(post_ids)
        return self.tables.lookup(
            np.full(n, user_id),
            post_ids,
            np.full(n, self.day),
            np.full(n, self.now),
            np.zeros(n),
        )

    def allowed(self, user_id: int, post_ids: np.ndarray) -> np.ndarray:
        """bool [N]: not from a followed creator (this is the *suggested* feed) and not seen."""
        followed = self.follows[self.follows_indptr[user_id] : self.follows_indptr[user_id + 1]]
        seen = self.seen[self.seen_indptr[user_id] : self.seen_indptr[user_id + 1]]
        creators = self.tables.attrs.post_creator[post_ids]
        return ~np.isin(creators, followed) & ~np.isin(post_ids, seen)

    def post_age_days(self, post_ids: np.ndarray) -> np.ndarray:
        return self.now - self.tables.attrs.post_created_at[post_ids]

    def post_creator(self, post_ids: np.ndarray) -> np.ndarray:
        return self.tables.attrs.post_creator[post_ids]
