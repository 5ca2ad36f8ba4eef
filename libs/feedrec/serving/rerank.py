"""Re-ranking: value model over the ranker heads, freshness boost, max posts per creator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from feedrec.schema.registry import TASKS


def _default_weights() -> dict[str, float]:
    # Engagement value per event; hides cost more than a like earns. Dwell is per second.
    return {"like": 1.0, "comment": 2.0, "share": 3.0, "hide": -4.0, "dwell": 0.02}


@dataclass(frozen=True)
class RerankConfig:
    """Args:
    weights: value model, task -> weight on that head's prediction.
    freshness_weight: score multiplier bonus for a brand-new post, decaying with age.
    freshness_days: e-folding time of that bonus.
    max_per_creator: at most this many posts of one creator in a response.
    """

    weights: dict[str, float] = field(default_factory=_default_weights)
    freshness_weight: float = 0.3
    freshness_days: float = 2.0
    max_per_creator: int = 2

    def __post_init__(self) -> None:
        unknown = set(self.weights) - set(TASKS)
        if unknown:
            raise ValueError(f"rerank config: unknown task(s) in weights {sorted(unknown)}")
        if self.max_per_creator < 1 or self.freshness_days <= 0:
            raise ValueError("rerank config: max_per_creator >= 1 and freshness_days > 0")


def value_scores(predictions: np.ndarray, weights: dict[str, float]) -> np.ndarray:
    """[N, len(TASKS)] head predictions -> [N] value."""
    w = np.array([weights.get(t, 0.0) for t in TASKS], dtype=np.float64)
    return np.asarray(predictions, dtype=np.float64) @ w


def rerank(
    post_ids: np.ndarray,
    predictions: np.ndarray,
    creators: np.ndarray,
    ages_days: np.ndarray,
    count: int,
    cfg: RerankConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Pick ``count`` posts. Returns (indices into the inputs, final scores), best first.

    Final score = value * (1 + freshness_weight * exp(-age / freshness_days)); then a greedy pass
    keeps at most ``max_per_creator`` posts per creator.
    """
    value = value_scores(predictions, cfg.weights)
    boost = 1.0 + cfg.freshness_weight * np.exp(-np.maximum(ages_days, 0.0) / cfg.freshness_days)
    # A negative value must not be made "better" by the boost: scale only the positive part.
    final = np.where(value > 0, value * boost, value)
    chosen: list[int] = []
    per_creator: dict[int, int] = {}
    for i in np.argsort(-final, kind="stable"):
        c = int(creators[i])
        if per_creator.get(c, 0) < cfg.max_per_creator:
            chosen.append(int(i))
            per_creator[c] = per_creator.get(c, 0) + 1
            if len(chosen) == count:
                break
    idx = np.asarray(chosen, dtype=np.int64)
    return idx, final[idx]
