"""Ranking and retrieval metrics in plain numpy (no Ray, no torch)."""

from __future__ import annotations

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the rank-sum statistic, ties counted half. NaN if only one class is present."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average rank within runs of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), eps, 1 - eps)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 20) -> float:
    """ECE over equal-mass bins of the predicted probability."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if len(p) == 0:
        return float("nan")
    order = np.argsort(p)
    err = 0.0
    for chunk in np.array_split(order, bins):
        if len(chunk):
            err += len(chunk) * abs(p[chunk].mean() - y[chunk].mean())
    return float(err / len(p))


def recall_at_k(retrieved: np.ndarray, relevant: list[np.ndarray], k: int) -> float:
    """Mean over users (with >= 1 relevant item) of |top-k ∩ relevant| / |relevant|.

    Args:
        retrieved: int [U, >=k] item ids per user, best first.
        relevant: per user, the ids of the items they engaged with.
    """
    scores = []
    for row, rel in zip(retrieved, relevant, strict=True):
        if len(rel):
            scores.append(np.isin(rel, row[:k]).mean())
    return float(np.mean(scores)) if scores else float("nan")
