"""Exploration: a logging policy whose every served slot has a known, non-zero probability.

Off-policy evaluation (:mod:`feedrec.experiments.off_policy`) can only score a new ranker on
the slots where the logging policy could have shown what the new ranker would show. A
deterministic chain gives those slots probability 0 or 1; this module randomises a share of the
feeds in a way whose probabilities are exact and cheap:

* the chain ranks and re-ranks as usual, but fills a *pool* of ``M = max(pool_size, count)``
  posts (the re-ranker is greedy slot by slot, so the pool's first ``count`` posts are exactly
  the feed it would have served);
* with probability ``1 - epsilon`` the feed is the pool's first ``count`` posts;
* with probability ``epsilon`` it is ``count`` posts drawn uniformly without replacement from
  the pool, in uniformly random order.

So post ``j`` is in slot ``k`` with probability (:meth:`Exploration.propensity`)::

    mu(j, k) = (1 - epsilon) * [pool[k] == j] + epsilon / M      for j in the pool, else 0

which every served slot logs. An explored feed keeps the hard rules that hold for any subset of
the pool (eligibility, blocked and followed creators, seen posts, at most ``max_per_creator``
per creator) but not the order-dependent ones (topic window, small-creator slots): exploration
costs some diversity on ``epsilon`` of the feeds, which the experiment report of the arm shows.

The draw is a function of the request id (sha256-seeded), so a logged feed can be re-derived.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Slate:
    """The served order of one feed drawn from its pool.

    index: int64 [K] positions in the pool of the served posts, slot by slot; propensity:
    float64 [K] probability of each served post being in its slot; explored: whether the
    random branch was taken; pool_size: M.
    """

    index: np.ndarray
    propensity: np.ndarray
    explored: bool
    pool_size: int


@dataclass(frozen=True)
class SlateLog:
    """What the feed service logs about how a feed's items were drawn: pool: post ids [M], the
    pool in the chain's order; propensity: [K] per served slot; explored: random branch."""

    pool: list[int]
    propensity: list[float]
    explored: bool


class Exploration(BaseModel):
    """``exploration:`` of an experiment variant (off unless ``epsilon > 0``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(default=0.0, ge=0.0, le=1.0, description="share of explored feeds")
    pool_size: int = Field(
        default=20, ge=1, le=500, description="posts the explored feeds are drawn from (M)"
    )

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0.0

    def pool_for(self, count: int) -> int:
        """Posts to re-rank into the pool for a feed of ``count``."""
        return max(self.pool_size, count) if self.enabled else count

    def propensity(self, in_slot: np.ndarray, pool_size: int) -> np.ndarray:
        """mu(j, k) of posts in the pool: ``in_slot`` bool [N], whether the post is the pool's
        post for that slot (``pool[k] == j``) -> float64 [N]."""
        greedy = np.asarray(in_slot, dtype=np.float64)
        return (1.0 - self.epsilon) * greedy + self.epsilon / pool_size

    def slate(self, request_id: str, pool_size: int, count: int) -> Slate:
        """The served order for a pool of ``pool_size`` posts (fewer than asked for when the
        chain had fewer candidates) and a feed of ``count``."""
        k = min(count, pool_size)
        rng = np.random.default_rng(
            int.from_bytes(hashlib.sha256(request_id.encode()).digest()[:8], "little")
        )
        explored = self.enabled and bool(rng.random() < self.epsilon)
        if explored:
            index = rng.permutation(pool_size)[:k].astype(np.int64)
        else:
            index = np.arange(k, dtype=np.int64)
        if not self.enabled:
            return Slate(index, np.ones(k), False, pool_size)
        propensity = self.propensity(index == np.arange(k), pool_size)
        return Slate(index, propensity, explored, pool_size)


#: A variant that does not explore.
NO_EXPLORATION = Exploration()
