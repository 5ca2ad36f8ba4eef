import numpy as np
import pytest

from feedrec.serving.rerank import RerankConfig, rerank, value_scores


def _preds(likes: list[float]) -> np.ndarray:
    p = np.zeros((len(likes), 5))
    p[:, 0] = likes
    return p


def test_at_most_max_per_creator() -> None:
    ids = np.arange(6)
    idx, _ = rerank(
        ids,
        _preds([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]),
        np.array([1, 1, 1, 2, 2, 3]),
        np.zeros(6),
        5,
        RerankConfig(max_per_creator=2),
    )
    assert idx.tolist() == [0, 1, 3, 4, 5]


def test_freshness_boost_reorders_close_scores() -> None:
    cfg = RerankConfig(freshness_weight=0.5, freshness_days=1.0)
    idx, final = rerank(
        np.arange(2), _preds([0.50, 0.45]), np.array([1, 2]), np.array([5.0, 0.0]), 2, cfg
    )
    assert idx.tolist() == [1, 0] and final[0] > final[1]


def test_hide_weight_is_negative_and_boost_never_helps_negative_values() -> None:
    p = np.zeros((2, 5))
    p[0, 3] = 0.5  # likely hidden
    p[1, 0] = 0.1
    assert value_scores(p, RerankConfig().weights)[0] < 0
    idx, _ = rerank(np.arange(2), p, np.array([1, 2]), np.array([0.0, 9.0]), 2, RerankConfig())
    assert idx.tolist() == [1, 0]


def test_config_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        RerankConfig(weights={"likes": 1.0})
