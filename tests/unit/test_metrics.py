import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from feedrec.evaluation.metrics import auc, expected_calibration_error, logloss, recall_at_k


def test_auc_matches_sklearn_including_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.2
    s = np.round(rng.random(2000) + y * 0.3, 1)  # heavy ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.isnan(auc(np.zeros(5), np.arange(5)))


def test_logloss_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    y, p = rng.random(500) < 0.3, rng.random(500)
    assert logloss(y, p) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_ece_is_zero_for_calibrated_and_large_for_biased() -> None:
    rng = np.random.default_rng(2)
    p = rng.random(200_000)
    y = rng.random(200_000) < p
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.1


def test_recall_at_k() -> None:
    retrieved = np.array([[1, 2, 3, 4], [9, 8, 7, 6]])
    relevant = [np.array([2, 4]), np.array([1])]
    assert recall_at_k(retrieved, relevant, 2) == pytest.approx((0.5 + 0.0) / 2)
    assert recall_at_k(retrieved, relevant, 4) == pytest.approx((1.0 + 0.0) / 2)
