"""Ranking and retrieval metrics in plain numpy (no Ray, no torch)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: The systems evaluation compares, in report order. ``oracle_no_taste`` is the ground truth
#: without the users' latent taste; ``history_oracle`` also estimates each user's topic
#: interests from their logged impressions (``feedrec.evaluation.evaluate``).
SYSTEMS = ("model", "oracle", "oracle_no_taste", "history_oracle", "popularity")


def systems_in(section: Mapping[str, object]) -> list[str]:
    """The systems a metrics section has numbers for, in report order (no oracles without a
    ground truth)."""
    return [s for s in SYSTEMS if s in section]


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


# Full-ranking retrieval metrics: binary relevance, averaged over users with >= 1 relevant item.


def _hits(
    retrieved: np.ndarray, relevant: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(bool [U', k] whether rank i of user u is relevant, int [U'] relevant count) over the
    users with >= 1 relevant item. Ranks past the end of a row (or ids < 0) are never hits."""
    hits, counts = [], []
    for row, rel in zip(retrieved, relevant, strict=True):
        rel = np.unique(np.asarray(rel))
        if not len(rel):
            continue
        top = np.asarray(row[:k])
        hit = np.zeros(k, dtype=bool)
        hit[: len(top)] = (top >= 0) & np.isin(top, rel)
        hits.append(hit)
        counts.append(len(rel))
    if not hits:
        return np.zeros((0, k), dtype=bool), np.zeros(0, dtype=np.int64)
    return np.stack(hits), np.asarray(counts, dtype=np.int64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def ndcg_at_k(retrieved: np.ndarray, relevant: list[np.ndarray], k: int) -> float:
    """Mean NDCG@k: DCG = sum over ranks i < k of rel_i / log2(i + 2), divided by the DCG of an
    ideal ranking (min(k, |relevant|) hits first). Args as :func:`recall_at_k`."""
    hits, counts = _hits(retrieved, relevant, k)
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = np.cumsum(discount)[np.minimum(counts, k) - 1] if len(counts) else np.zeros(0)
    return _mean((hits * discount).sum(axis=1) / ideal)


def mrr_at_k(retrieved: np.ndarray, relevant: list[np.ndarray], k: int) -> float:
    """Mean reciprocal rank of the first relevant item within the top k (0 when none)."""
    hits, _ = _hits(retrieved, relevant, k)
    first = hits.argmax(axis=1)
    return _mean(np.asarray(np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)))


def hit_at_k(retrieved: np.ndarray, relevant: list[np.ndarray], k: int) -> float:
    """Share of users with at least one relevant item in their top k."""
    hits, _ = _hits(retrieved, relevant, k)
    return _mean(np.asarray(hits.any(axis=1), dtype=np.float64))


def ranking_metrics(
    retrieved: np.ndarray, relevant: list[np.ndarray], ks: tuple[int, ...]
) -> dict[str, float]:
    """``recall@k``, ``ndcg@k``, ``mrr@k`` and ``hit@k`` for every k in ``ks``."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(retrieved, relevant, k)
        out[f"ndcg@{k}"] = ndcg_at_k(retrieved, relevant, k)
        out[f"mrr@{k}"] = mrr_at_k(retrieved, relevant, k)
        out[f"hit@{k}"] = hit_at_k(retrieved, relevant, k)
    return out


def top_k_excluding(
    scores: np.ndarray, item_ids: np.ndarray, exclude: list[np.ndarray], k: int
) -> np.ndarray:
    """Each user's k best items over the whole candidate set, never one of their excluded items.

    Args:
        scores: float [U, C] score of candidate c for user u (NaN counts as the worst).
        item_ids: int [C] id of each candidate.
        exclude: per user, ids that must not be returned (e.g. their training interactions).
        k: how many to return.

    Returns:
        int64 [U, min(k, C)] ids, best first (equal scores: lower candidate index first, also
        at the cut); -1 where fewer than k candidates are left.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    # NaN ranks below every number but stays a candidate; -inf marks the excluded.
    s = np.nan_to_num(np.array(scores, dtype=np.float64), nan=np.finfo(np.float64).min)
    for u, ex in enumerate(exclude):
        if len(ex):
            s[u, np.isin(item_ids, ex)] = -np.inf
    k = min(k, s.shape[1])
    if k == 0:
        return np.zeros((len(s), 0), dtype=np.int64)
    # The k-th best score per row; everything better is in, and ties at it are filled in
    # candidate order, so the cut is deterministic (argpartition alone picks ties arbitrarily).
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1 : k]
    tied = s == kth
    need = k - (s > kth).sum(axis=1, keepdims=True)
    chosen = (s > kth) | (tied & (np.cumsum(tied, axis=1) <= need))
    top = np.nonzero(chosen)[1].reshape(len(s), k)  # row-major: each row's k columns in order
    top_scores = np.take_along_axis(s, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    top_scores = np.take_along_axis(top_scores, order, axis=1)
    return np.where(np.isneginf(top_scores), -1, item_ids[top])
