"""How likely a candidate is to fill one slot of a two-tower training batch: what the logQ
(sampling-bias) correction subtracts from the logits (Yi et al., RecSys 2019).

With in-batch negatives only, every slot holds one of the batch's positives, so a post's chance
is its share of the training positives. With mixed negatives (Yang et al., WWW 2020) half the
slots are random eligible posts instead, and the two kinds differ in age as well as in post:
positives are liked posts, mostly young ones; random draws are spread over the whole lifetime.
An age-blind q(post) then under-corrects young candidates and over-corrects old ones, and the
towers learn to push fresh posts down to compensate (measured: adding a freshness term to the
scores after training raised Recall@100 on every seed). So here the positive half of q also
carries the positives' age density relative to the random draws'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Age bins (equal width, days) of the positives' / random draws' age density ratio.
AGE_BINS = 16


@dataclass(frozen=True)
class CandidateProbability:
    """log q(post, age) of one candidate slot, relative to the random draws' age density.

    Shapes: ``log_positive`` [P] each post's log share of the training positives (smoothed);
    ``log_proposal`` [P] its log chance to be a row's random negative
    (``NegativeSampler.log_proposal``), None without mixed negatives; ``age_edges`` [A + 1]
    bin edges (days) and ``log_age_ratio`` [A] log(positives' age density / random draws' age
    density) per bin, both empty without mixed negatives or without random draws (age-blind).
    """

    log_positive: np.ndarray
    log_proposal: np.ndarray | None = None
    age_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    log_age_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        if self.log_proposal is not None and self.log_proposal.shape != self.log_positive.shape:
            raise ValueError("candidate probability: one log_proposal per post")
        if len(self.age_edges) != (len(self.log_age_ratio) + 1 if len(self.log_age_ratio) else 0):
            raise ValueError("candidate probability: age_edges must bound the log_age_ratio bins")

    @classmethod
    def of(
        cls,
        post_id: np.ndarray,
        positive_age: np.ndarray,
        n_posts: int,
        log_proposal: np.ndarray | None = None,
        random_age: np.ndarray | None = None,
    ) -> CandidateProbability:
        """From the training positives (post ids [N], ages in days at their impressions [N]) and,
        with mixed negatives, the proposal [P] and a sample of random draws' ages [M]."""
        counts = np.bincount(post_id, minlength=n_posts).astype(np.float64) + 0.5
        log_positive = np.log(counts / counts.sum())
        if log_proposal is None:
            return cls(log_positive)
        if random_age is None or not len(random_age) or not len(positive_age):
            # No draw to compare ages with (an imported log whose days have no eligible post
            # yet): the age-blind mixture.
            return cls(log_positive, log_proposal)
        hi = max(float(np.max(positive_age)), float(np.max(random_age)), 1e-3)
        edges = np.linspace(0.0, hi, AGE_BINS + 1)
        # Laplace-smoothed densities on the same bins: no bin is log 0.
        pos = np.histogram(np.clip(positive_age, 0.0, hi), edges)[0] + 1.0
        rnd = np.histogram(np.clip(random_age, 0.0, hi), edges)[0] + 1.0
        ratio = np.log(pos / pos.sum()) - np.log(rnd / rnd.sum())
        return cls(log_positive, log_proposal, edges, ratio)

    def log_q(self, post_id: np.ndarray, age: np.ndarray) -> np.ndarray:
        """float32 [N]: log q of candidates (post ids [N] at ages [N] in days)."""
        if self.log_proposal is None:
            return self.log_positive[post_id].astype(np.float32)
        ratio: np.ndarray | float = 0.0
        if len(self.log_age_ratio):
            inner = self.age_edges[1:-1]  # bins past either end take the end bins' ratio
            ratio = self.log_age_ratio[np.searchsorted(inner, age, side="right")]
        mixed = np.logaddexp(self.log_positive[post_id] + ratio, self.log_proposal[post_id])
        return (mixed - np.log(2.0)).astype(np.float32)
