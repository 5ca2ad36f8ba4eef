from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from feedrec.evaluation.metrics import (
    auc,
    expected_calibration_error,
    hit_at_k,
    logloss,
    mrr_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    top_k_excluding,
)
from feedrec.evaluation.report import write_report
from feedrec.evaluation.summary import format_summary


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


# Full-ranking metrics against hand-computed values. log2(3) = 1.58496, log2(5) = 2.32193.
RETRIEVED = np.array([[1, 2, 3, 4], [9, 8, 7, 6], [5, 6, 7, 8]])
RELEVANT = [np.array([2, 4]), np.array([1]), np.array([], dtype=np.int64)]  # user 3: skipped


def test_full_ranking_metrics_by_hand() -> None:
    # user 1 hits at ranks 2 and 4, user 2 never.
    dcg2, dcg4 = 1 / np.log2(3), 1 / np.log2(3) + 1 / np.log2(5)
    ideal = 1 + 1 / np.log2(3)
    assert ndcg_at_k(RETRIEVED, RELEVANT, 2) == pytest.approx((dcg2 / ideal + 0) / 2)
    assert ndcg_at_k(RETRIEVED, RELEVANT, 4) == pytest.approx((dcg4 / ideal + 0) / 2)
    assert ndcg_at_k(RETRIEVED, RELEVANT, 2) == pytest.approx(0.193426, abs=1e-6)
    assert mrr_at_k(RETRIEVED, RELEVANT, 1) == 0.0
    assert mrr_at_k(RETRIEVED, RELEVANT, 4) == pytest.approx((1 / 2 + 0) / 2)
    assert hit_at_k(RETRIEVED, RELEVANT, 1) == 0.0
    assert hit_at_k(RETRIEVED, RELEVANT, 2) == pytest.approx(0.5)
    metrics = ranking_metrics(RETRIEVED, RELEVANT, (2, 4))
    assert metrics["recall@2"] == pytest.approx(0.25) and metrics["recall@4"] == pytest.approx(0.5)
    assert set(metrics) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr", "hit") for k in (2, 4)}


def test_ndcg_ideal_is_capped_at_k_and_perfect_rankings_score_one() -> None:
    # 3 relevant, k = 2: the ideal DCG has 2 hits, so one hit at rank 1 gives 1 / (1 + 1/log2 3).
    assert ndcg_at_k(np.array([[1, 9, 2]]), [np.array([1, 2, 3])], 2) == pytest.approx(
        1 / (1 + 1 / np.log2(3))
    )
    assert ndcg_at_k(np.array([[3, 1, 2]]), [np.array([1, 2, 3])], 3) == pytest.approx(1.0)
    assert mrr_at_k(np.array([[7, 8, 1]]), [np.array([1])], 3) == pytest.approx(1 / 3)
    # rows shorter than k and -1 padding never count as hits
    assert hit_at_k(np.array([[-1, -1]]), [np.array([1])], 5) == 0.0
    assert np.isnan(ndcg_at_k(RETRIEVED[:1], [np.array([])], 2))  # no user with relevant items


def test_top_k_excluding_never_returns_excluded_items() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [1.0, 2.0, 3.0, np.nan]])
    ids = np.array([10, 11, 12, 13])
    top = top_k_excluding(scores, ids, [np.array([12]), np.array([10, 11, 12])], 3)
    # ties (11 and 13 both 0.9) keep candidate order; NaN ranks last; -1 when none are left
    assert top.tolist() == [[11, 13, 10], [13, -1, -1]]
    assert top_k_excluding(scores, ids, [np.array([]), np.array([])], 10).shape == (2, 4)
    # the same ranking as a full sort when nothing is excluded
    rng = np.random.default_rng(0)
    s = rng.random((5, 50))
    full = np.argsort(-s, axis=1)[:, :7]
    np.testing.assert_array_equal(top_k_excluding(s, np.arange(50), [np.array([])] * 5, 7), full)


def test_summary_and_report_without_an_oracle(tmp_path: Path) -> None:
    systems = {"model": {"auc": 0.6, "logloss": 0.5}, "popularity": {"auc": 0.55, "logloss": 0.6}}
    full = {"recall@10": 0.1, "ndcg@10": 0.05, "mrr@10": 0.04, "hit@10": 0.2}
    metrics = {
        "ranking": {
            "rows": 10,
            **{t: {"positives": 1, **systems} for t in ("like", "comment", "share", "hide")},
            "dwell": {"model": {"rmse": 1.0}, "popularity": {"rmse": 2.0}},
        },
        "retrieval": {
            "users": 3,
            "corpus": 20,
            "model": {"recall@10": 0.1},
            "popularity": {"recall@10": 0.2},
        },
        "full_ranking": {
            "users": 3,
            "corpus": 20,
            "k": [10],
            "excluded": "each user's training-split interactions",
            "model": full,
            "popularity": full,
        },
        "oracle": {"available": False, "reason": "no ground truth (imported logs)"},
        "training": {  # the report plots the validation quality by epoch too
            "ranker": [
                {"epoch": e, "train_loss": 1.0, "valid_loss": 1.0, "valid_auc_like": 0.7}
                for e in (0, 1)
            ],
            "two_tower": [{"epoch": 0, "train_loss": 1.0, "valid_loss": 1.0}],
        },
        "test_days": [5],
    }
    summary = format_summary(metrics)
    assert "oracle: unavailable (no ground truth (imported logs))" in summary
    assert "ndcg@10" in summary and summary.splitlines()[0].split()[-2:] == ["model", "popularity"]
    write_report(metrics, tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    assert "Oracle: unavailable" in html and "Full ranking" in html
