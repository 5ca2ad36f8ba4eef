"""Random negatives for the two-tower's mixed negative sampling (Yang et al., WWW 2020).

In-batch negatives are the other rows' positives, so they carry the positives' own biases: they
are fresh and popular, and a post never shows up as a negative outside the days it was liked.
The towers then cannot learn what sets a liked post apart from the rest of the corpus the index
serves, e.g. that a five-day-old post is less likely liked than a new one. One uniform draw per
row from the posts eligible on that row's day, aged as of the row's impression, adds exactly that
contrast.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from feedrec.features.tables import EntityAttributes


@dataclass(frozen=True)
class NegativeSampler:
    """Draws one post per row uniformly from the posts eligible on the row's day.

    Build with :meth:`of`. ``order`` [P]: post ids by creation time; ``created`` [P]: their
    creation times, so a day's eligible posts are one contiguous slice of ``order``.
    """

    attrs: EntityAttributes
    lifetime_days: float
    order: np.ndarray
    created: np.ndarray

    @classmethod
    def of(cls, attrs: EntityAttributes, lifetime_days: float) -> NegativeSampler:
        """The sampler over ``attrs``' posts; it keeps their post-side arrays only."""
        if lifetime_days <= 0:
            raise ValueError("negative sampler: lifetime_days must be > 0")
        posts = attrs.post_side()
        order = np.argsort(posts.post_created_at, kind="stable")
        return cls(posts, float(lifetime_days), order, posts.post_created_at[order])

    def _slices(self, day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[lo, hi) into ``order`` of the posts eligible on each ``day`` [N].

        :func:`feedrec.world.config.eligible_posts` (created in ``[day - lifetime, day)``) on
        sorted creation times; a unit test holds the two to the same posts.
        """
        day = np.asarray(day, dtype=np.float64)
        lo = np.searchsorted(self.created, day - self.lifetime_days, side="left")
        hi = np.searchsorted(self.created, day, side="left")
        return lo, hi

    def sample(
        self, day: np.ndarray, ts: np.ndarray, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """One random eligible post per row: (its item-side raw columns
        (``EntityAttributes.post_columns``), bool [N] ``drawn``).

        A row whose day has no eligible post (the first day of imported logs, where a post is
        created at its first interaction) draws none: ``drawn`` is False and its columns are a
        placeholder the loss must mask out.

        Args:
            day: int [N] each row's day; ts: float [N] its impression time in days (the drawn
                post's age is taken then, as the positive's is).
        """
        lo, hi = self._slices(day)
        drawn = hi > lo
        pick = lo + (rng.random(len(lo)) * np.maximum(hi - lo, 0)).astype(np.int64)
        post = self.order[np.clip(pick, 0, len(self.order) - 1)]
        return self.attrs.post_columns(post, at=np.asarray(ts, dtype=np.float64)), drawn

    def log_proposal(self, rows_per_day: Mapping[int, int]) -> np.ndarray:
        """float64 [P]: log of each post's chance to be a given row's random negative, over rows
        spread across days as ``rows_per_day`` says (posts never drawn get a floor, not -inf)."""
        total = sum(rows_per_day.values())
        if total <= 0:
            raise ValueError("negative sampler: no rows to size the proposal by")
        prob = np.zeros(self.attrs.n_posts)
        days = np.fromiter(rows_per_day, dtype=np.float64, count=len(rows_per_day))
        rows_each = rows_per_day.values()
        for rows, lo, hi in zip(rows_each, *self._slices(days), strict=True):
            if hi > lo:
                prob[self.order[lo:hi]] += rows / total / (hi - lo)
        return np.log(np.maximum(prob, 1e-12))
