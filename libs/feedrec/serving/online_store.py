"""The embedded online feature store: the serving day's slice of the point-in-time tables.

It holds exactly what the offline join used for that day (``FeatureSnapshot``), so a
(user, post) pair scored online gets the same raw features as the offline example would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from feedrec.data.preprocess import PreprocessLayout
from feedrec.features.tables import FeatureSnapshot
from feedrec.serving.rerank import Candidates
from feedrec.world.generator import load_world_config
from feedrec.world.layout import WorldLayout


def _csr(keys: np.ndarray, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys row * n_cols + col -> (indptr [n_rows + 1], cols)."""
    rows, cols = keys // n_cols, keys % n_cols
    return np.searchsorted(rows, np.arange(n_rows + 1)), cols


def _row(indptr: np.ndarray, cols: np.ndarray, row: int) -> np.ndarray:
    return cols[indptr[row] : indptr[row + 1]]


@dataclass(frozen=True)
class OnlineFeatureStore:
    """Features of users and posts as of ``now`` (days on the world clock).

    Attributes:
        tables: the serving day's feature snapshot.
        now: request time used for post ages (start of the serving day).
        eligible: int64 [E] posts that may be suggested (created within the post lifetime).
        popular: int64 [E] the eligible posts by likes so far, most liked first.
        follows_*, seen_*, hidden_*: CSR rows per user of followed creators, posts already
            shown, and creators of posts the user hid.
        small_creators: bool [C] creators at or below the ``small_quantile`` of followers (the
            ones re-ranking guarantees a share of exposure).
        segment_topic_rate: float [S + 1, T] smoothed like rate per impression by user segment
            and post topic over the feature window; row S is all users (unknown segment).
        snapshot: names the feature snapshot served (serving day + preprocess run), recorded
            with every served feed so training rows are rebuilt from the same features.
    """

    tables: FeatureSnapshot
    now: float
    eligible: np.ndarray
    popular: np.ndarray
    follows_indptr: np.ndarray
    follows: np.ndarray
    seen_indptr: np.ndarray
    seen: np.ndarray
    hidden_indptr: np.ndarray
    hidden: np.ndarray
    small_creators: np.ndarray
    segment_topic_rate: np.ndarray
    snapshot: str = ""

    @classmethod
    def load(
        cls, data_dir: Path, world_dir: Path, small_quantile: float = 0.25
    ) -> OnlineFeatureStore:
        data, world = PreprocessLayout(Path(data_dir)), WorldLayout(Path(world_dir))
        day = int(data.read_meta()["serving_day"])
        tables = FeatureSnapshot.load(data.tables, day)
        attrs = tables.attrs
        lifetime = load_world_config(world).post_lifetime_days
        created = attrs.post_created_at
        eligible = np.flatnonzero((created < day) & (created >= day - lifetime))
        likes = tables.post_stat(eligible, "likes")
        popular = eligible[np.argsort(-likes, kind="stable")]
        follows = pq.read_table(world.follows)
        follow_keys = np.sort(
            follows.column("user_id").to_numpy() * len(attrs.creator_followers)
            + follows.column("creator_id").to_numpy()
        )
        n_creators = len(attrs.creator_followers)
        f_ptr, f_cols = _csr(follow_keys, attrs.n_users, n_creators)
        s_ptr, s_cols = _csr(np.load(data.seen, allow_pickle=False), attrs.n_users, attrs.n_posts)
        h_ptr, h_cols = _csr(np.load(data.hidden, allow_pickle=False), attrs.n_users, n_creators)
        followers = attrs.creator_followers
        small = followers <= np.quantile(followers, small_quantile)
        # user x topic (imps, likes) -> per segment; +1 like / +20 imps smoothing.
        ut, n_topics = tables.stats.user_topic, tables.stats.n_topics
        n_seg = int(attrs.user_segment.max()) + 1 if attrs.n_users else 0
        imps = np.zeros((n_seg + 1, n_topics))
        likes = np.zeros_like(imps)
        at = (attrs.user_segment[ut.keys // n_topics], ut.keys % n_topics)
        np.add.at(imps, at, ut.values[:, 0])
        np.add.at(likes, at, ut.values[:, 1])
        imps[n_seg], likes[n_seg] = imps[:n_seg].sum(axis=0), likes[:n_seg].sum(axis=0)
        rate = (likes + 1.0) / (imps + 20.0)
        return cls(
            tables,
            float(day),
            eligible,
            popular,
            f_ptr,
            f_cols,
            s_ptr,
            s_cols,
            h_ptr,
            h_cols,
            small,
            rate,
            f"day{day}-{hashlib.sha256(data.meta.read_bytes()).hexdigest()[:12]}",
        )

    @property
    def day(self) -> int:
        return self.tables.day

    def knows_user(self, user_id: int) -> bool:
        return 0 <= user_id < self.tables.attrs.n_users

    def user_raw(self, user_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Raw user-side columns for users [B] (the user tower's inputs)."""
        return self.tables.user_columns(user_ids, np.full(len(user_ids), self.day))

    def ranker_raw(self, user_id: int | np.ndarray, post_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Raw columns for scoring ``post_ids`` [N] for one user (or ``user_id`` [N], a user per
        row), at the top of the feed."""
        n = len(post_ids)
        return self.tables.lookup(
            np.full(n, user_id),
            post_ids,
            np.full(n, self.day),
            np.full(n, self.now),
            np.zeros(n),
        )

    def exclusions(
        self, user_id: int, post_ids: np.ndarray, blocked_creators: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """Why each of ``post_ids`` [N] must not be suggested: reason -> bool [N].

        followed: from a creator the user follows (this is the *suggested* feed); seen: shown
        before; hidden: from a creator one of whose posts the user hid; blocked: from a creator
        in ``blocked_creators`` (the request's block list).
        """
        creators = self.tables.attrs.post_creator[post_ids]
        blocked = np.asarray(blocked_creators if blocked_creators is not None else [], np.int64)
        return {
            "followed": np.isin(creators, _row(self.follows_indptr, self.follows, user_id)),
            "seen": np.isin(post_ids, _row(self.seen_indptr, self.seen, user_id)),
            "hidden": np.isin(creators, _row(self.hidden_indptr, self.hidden, user_id)),
            "blocked": np.isin(creators, blocked),
        }

    def allowed(
        self, user_id: int, post_ids: np.ndarray, blocked_creators: np.ndarray | None = None
    ) -> np.ndarray:
        """bool [N]: none of :meth:`exclusions` applies."""
        excluded = self.exclusions(user_id, post_ids, blocked_creators).values()
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
        posts = self.popular[: max(20 * n, 500)]
        topics = self.tables.attrs.post_topic[posts]
        row = self.n_segments if segment is None else segment
        likes = self.tables.post_stat(posts, "likes")
        score = (1.0 + likes) * self.segment_topic_rate[row, topics]
        score = score * np.where(np.isin(topics, interests), 2.0, 1.0)
        order = np.argsort(-score, kind="stable")[:n]
        return posts[order], score[order]

    def post_topic(self, post_ids: np.ndarray) -> np.ndarray:
        return self.tables.attrs.post_topic[post_ids]

    def small_creator(self, post_ids: np.ndarray) -> np.ndarray:
        """bool [N]: the post's creator is small (see ``small_creators``)."""
        return self.small_creators[self.tables.attrs.post_creator[post_ids]]

    def post_age_days(self, post_ids: np.ndarray) -> np.ndarray:
        return self.now - self.tables.attrs.post_created_at[post_ids]

    def post_creator(self, post_ids: np.ndarray) -> np.ndarray:
        return self.tables.attrs.post_creator[post_ids]

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
