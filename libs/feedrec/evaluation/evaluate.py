"""Offline evaluation on the test split: model vs the world's oracle vs a popularity baseline.

The oracle needs the world's ground truth (``truth/``); imported logs have none, and then every
oracle number is left out and ``metrics["oracle"]`` says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from feedrec.artifacts import load_artifact
from feedrec.data.examples import columns_from_arrow
from feedrec.data.preprocess import PreprocessLayout
from feedrec.evaluation.metrics import (
    SYSTEMS,
    auc,
    expected_calibration_error,
    logloss,
    ranking_metrics,
    recall_at_k,
    top_k_excluding,
)
from feedrec.features.tables import INDEX_TIME_OF_DAY, FeatureSnapshot, FeatureTables
from feedrec.features.transform import FeatureTransform
from feedrec.models.batch import BINARY_TASKS
from feedrec.models.predictor import RankerPredictor, TowerEncoder
from feedrec.retrieval.post_index import PostIndex
from feedrec.world.config import eligible_posts
from feedrec.world.generator import load_world_config, truth_for_day
from feedrec.world.layout import WorldLayout
from feedrec.world.truth import GroundTruth

RECALL_KS = (10, 50, 100, 200, 500)
#: Cut-offs of the full-ranking metrics (Recall, NDCG, MRR, Hit).
FULL_RANKING_KS = (10, 20, 50, 100)
#: Users scored at once in full ranking (bounds the [users, corpus] score matrix).
USER_CHUNK = 256
#: Pseudo-impressions of the popularity baseline's shrinkage towards the all-post rate.
POPULARITY_PRIOR = 20.0
_POPULARITY_COLUMN = {
    "like": "p_likes",
    "comment": "p_comments",
    "share": "p_shares",
    "hide": "p_hides",
}

logger = logging.getLogger("feedrec.evaluate")


@dataclass(frozen=True)
class EvaluationConfig:
    """Args: max_users: users sampled for retrieval metrics; seed for that sample."""

    world_dir: Path
    data_dir: Path
    ranker_dir: Path
    two_tower_dir: Path
    out_dir: Path
    max_users: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_users < 1:
            raise ValueError("evaluation config: max_users must be >= 1")


def _ranking(
    raw: dict[str, np.ndarray],
    truth: dict[str, np.ndarray] | None,
    predictor: RankerPredictor,
    transform: FeatureTransform,
    references: dict[str, dict[str, np.ndarray]],
) -> dict[str, Any]:
    """Per head: AUC, logloss (and ECE) of the model, the oracle, the ``references`` (system ->
    per-row probabilities of each binary task and expected ``dwell``, see
    :func:`_truth_references`) and popularity on the test rows ``raw``."""
    pred = predictor.predict(transform(raw, "ranker"))
    out: dict[str, Any] = {"rows": len(pred)}
    for i, task in enumerate(BINARY_TASKS):
        y = raw[task]
        # The post's rate so far, shrunk to the all-post rate of the same (earlier) days.
        events = raw[_POPULARITY_COLUMN[task]]
        prior = events.sum() / max(float(raw["p_imps"].sum()), 1.0)
        popularity = (events + POPULARITY_PRIOR * prior) / (raw["p_imps"] + POPULARITY_PRIOR)
        out[task] = {
            "positives": int(y.sum()),
            "model": {
                "auc": auc(y, pred[:, i]),
                "logloss": logloss(y, pred[:, i]),
                "ece": expected_calibration_error(y, pred[:, i]),
            },
            "popularity": {
                "auc": auc(y, popularity),
                "logloss": logloss(y, np.clip(popularity, 1e-4, 1 - 1e-4)),
            },
        }
        if truth is not None:
            out[task]["oracle"] = {
                "auc": auc(y, truth[f"p_{task}"]),
                "logloss": logloss(y, truth[f"p_{task}"]),
                "ece": expected_calibration_error(y, truth[f"p_{task}"]),
            }
            out[task]["model"]["auc_vs_oracle"] = (
                out[task]["model"]["auc"] / out[task]["oracle"]["auc"]
            )
        for name, probs in references.items():
            ref = {"auc": auc(y, probs[task]), "logloss": logloss(y, probs[task])}
            out[task][name] = ref
            out[task]["model"][f"auc_vs_{name}"] = out[task]["model"]["auc"] / ref["auc"]
    dwell = raw["dwell"]
    out["dwell"] = {
        "model": {"rmse": float(np.sqrt(np.mean((pred[:, -1] - dwell) ** 2)))},
        "popularity": {
            "rmse": float(np.sqrt(np.mean((raw["p_dwell"] / (raw["p_imps"] + 1) - dwell) ** 2)))
        },
    }
    if truth is not None:
        out["dwell"]["oracle"] = {"rmse": float(np.sqrt(np.mean((truth["e_dwell"] - dwell) ** 2)))}
    for name, probs in references.items():
        out["dwell"][name] = {"rmse": float(np.sqrt(np.mean((probs["dwell"] - dwell) ** 2)))}
    return out


def _truth_references(
    world: WorldLayout, tables: FeatureTables, raw: dict[str, np.ndarray], lifetime: float
) -> dict[str, dict[str, np.ndarray]]:
    """What the oracle's AUC would be with less of the truth, per test row of ``raw``.

    ``oracle_no_taste`` is the truth without the users' latent taste (every user's topic
    interests exact): the part of the oracle that no log feature carries is gone.
    ``history_oracle`` also replaces the interests by their estimate from each user's
    impressions in the feature window of the row's day (:func:`_logged_truth`). Both keep every
    post-side parameter exact. Returns: system -> {binary task, "dwell"} -> float64 [N].
    """
    keys = (*BINARY_TASKS, "dwell")
    n = len(raw["user_id"])
    out = {name: {k: np.zeros(n) for k in keys} for name in ("oracle_no_taste", "history_oracle")}
    for day in np.unique(raw["day"]):
        at = np.flatnonzero(raw["day"] == day)
        gt = truth_for_day(world, int(day))
        users, rows = np.unique(raw["user_id"][at], return_inverse=True)
        snap = tables.snapshot(int(day), users, np.zeros(0, np.int64))
        systems = {
            "oracle_no_taste": (gt.without_taste(), raw["user_id"][at]),
            "history_oracle": (_logged_truth(gt, snap, users, lifetime), rows),
        }
        for name, (truth, user_rows) in systems.items():
            probs = truth.probabilities(
                user_rows, raw["post_id"][at], raw["ts"][at], raw["position"][at]
            )
            for k in keys:
                out[name][k][at] = probs[k]
    return out


def _engaged_users(cfg: EvaluationConfig, raw: dict[str, np.ndarray]) -> np.ndarray:
    """Sorted sample (``cfg.max_users``, ``cfg.seed``) of the users engaged in the test split."""
    engaged = (raw["like"] + raw["comment"] + raw["share"]) > 0
    users_all = np.unique(raw["user_id"][engaged])
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.choice(users_all, size=min(cfg.max_users, len(users_all)), replace=False))


@dataclass(frozen=True)
class _RetrievalSetup:
    """What both retrieval sections share, built once.

    users [U]; engaged: per user, their engaged test posts; corpus [C]: posts eligible on the
    day; items [C, E] and user_emb [U, E]: tower embeddings; scorers: system -> (rows [R] ->
    float scores [R, C]).
    """

    users: np.ndarray
    engaged: list[np.ndarray]
    corpus: np.ndarray
    items: np.ndarray
    user_emb: np.ndarray
    scorers: dict[str, Callable[[np.ndarray], np.ndarray]]


def _retrieval_setup(
    cfg: EvaluationConfig,
    raw: dict[str, np.ndarray],
    tables: FeatureSnapshot,
    encoder: TowerEncoder,
    transform: FeatureTransform,
    gt: GroundTruth | None,
    lifetime: float,
    day: int,
) -> _RetrievalSetup:
    positive = (raw["like"] + raw["comment"] + raw["share"]) > 0
    users = _engaged_users(cfg, raw)
    engaged = [np.unique(raw["post_id"][positive & (raw["user_id"] == u)]) for u in users]
    corpus = eligible_posts(tables.attrs.post_created_at, day, lifetime)
    items = encoder.items(
        transform(tables.attrs.post_columns(corpus, at=day + INDEX_TIME_OF_DAY), "item_tower")
    )
    user_emb = encoder.users(
        transform(tables.user_columns(users, np.full(len(users), day)), "user_tower")
    )
    likes = tables.post_stat(corpus, "likes").astype(np.float64)
    scorers: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "model": lambda rows: user_emb[rows] @ items.T,
        "popularity": lambda rows: np.broadcast_to(likes, (len(rows), len(corpus))),
    }
    if gt is not None:
        scorers["oracle"] = _truth_scorer(gt, users, corpus, day)
        scorers["oracle_no_taste"] = _truth_scorer(gt.without_taste(), users, corpus, day)
        # The logged truth covers the sampled users only: row r is users[r].
        scorers["history_oracle"] = _truth_scorer(
            _logged_truth(gt, tables, users, lifetime), np.arange(len(users)), corpus, day
        )
    return _RetrievalSetup(users, engaged, corpus, items, user_emb, scorers)


def _truth_scorer(
    truth: GroundTruth, users: np.ndarray, corpus: np.ndarray, day: int
) -> Callable[[np.ndarray], np.ndarray]:
    """rows [R] -> [R, C]: ``truth``'s p(like) of each row's user for the corpus on ``day``."""
    at = day + INDEX_TIME_OF_DAY
    return lambda rows: np.stack(
        [truth.probabilities(np.full(len(corpus), users[r]), corpus, at)["like"] for r in rows]
    )


def interests_from_impressions(impressions: np.ndarray, topic_share: np.ndarray) -> np.ndarray:
    """Each user's topic interests estimated from what the logging policy showed them.

    The policy draws a post's topic about in proportion to the topic's share of the eligible
    posts times the user's interest in it (its score is log(interest + 0.02) plus noise), so
    impressions divided by share estimate the interests up to normalisation. One
    pseudo-impression per topic is the prior: a user never shown anything gets uniform ones.
    On the small world this beats the posterior from likes (about 1.6 a user a week): test AUC
    of like 0.754 vs 0.734 with the rest of the truth exact, and no latent taste.

    Args: impressions float [R, T] per user and topic (the feature window); topic_share float
    [T], summing to 1. Returns: float64 [R, T], rows summing to 1.
    """
    ratio = np.asarray(impressions, np.float64) / np.maximum(topic_share, 1e-12)
    return (ratio + 1.0) / (ratio.sum(axis=1, keepdims=True) + ratio.shape[1])


def _logged_truth(
    gt: GroundTruth, tables: FeatureSnapshot, users: np.ndarray, lifetime: float
) -> GroundTruth:
    """The ground truth as far as the logs reveal it about ``users`` (the ``history_oracle``).

    Every post-side parameter (topic, creator quality, media, age) stays exact. Each user's
    topic interests become their estimate from the impressions per topic in the feature
    window (:func:`interests_from_impressions`, what ``u_shown_topics`` and ``ut_imps`` carry
    to the models), and their latent taste, which no log feature carries, is zeroed. It shows
    how much of the oracle the logs identify: a reference for the models, not a bound (a model
    may read more history than the window, or estimate some taste from engagement).

    Returns: a truth over ``users`` only (user arrays [len(users), ...], row r is ``users[r]``),
    so the large worlds do not copy every user's parameters.
    """
    corpus = eligible_posts(tables.attrs.post_created_at, tables.day, lifetime)
    n_topics = tables.stats.n_topics
    share = np.bincount(tables.attrs.post_topic[corpus], minlength=n_topics) / max(len(corpus), 1)
    impressions = tables.topic_likes(users)[:, :, 0]
    theta = interests_from_impressions(impressions, share)
    z_user = np.zeros((len(users), gt.z_user.shape[1]), dtype=gt.z_user.dtype)
    return replace(gt, theta=theta, z_user=z_user, segment=gt.segment[users])


def _tops(
    setup: _RetrievalSetup, seen: list[np.ndarray], k_all: int, k_unseen: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per system: (its top ``k_all`` eligible posts, its top ``k_unseen`` never returning the
    user's ``seen`` posts), both from one scoring pass over chunks of users.

    The model's unfiltered top comes from the served faiss index over the same embeddings.
    """
    nothing: list[np.ndarray] = [np.zeros(0, np.int64)] * USER_CHUNK
    out = {}
    for name, scorer in setup.scorers.items():
        every, unseen = [], []
        for start in range(0, len(setup.users), USER_CHUNK):
            rows = np.arange(start, min(start + USER_CHUNK, len(setup.users)))
            scores = scorer(rows)
            every.append(top_k_excluding(scores, setup.corpus, nothing[: len(rows)], k_all))
            unseen.append(top_k_excluding(scores, setup.corpus, [seen[r] for r in rows], k_unseen))
        empty = np.zeros((0, 0), np.int64)
        out[name] = (
            np.concatenate(every) if every else empty,
            np.concatenate(unseen) if unseen else empty,
        )
    index, _ = PostIndex.build(setup.items, setup.corpus)
    _, model_top = index.search(setup.user_emb, k_all)
    out["model"] = (model_top, out["model"][1])
    return out


def _retrieval(
    setup: _RetrievalSetup, tops: dict[str, tuple[np.ndarray, np.ndarray]], k_max: int
) -> dict[str, Any]:
    """Recall@K of each user's engaged test posts among all posts eligible on the day."""
    result: dict[str, Any] = {
        "users": len(setup.users),
        "corpus": len(setup.corpus),
        "k": list(RECALL_KS),
    }
    for name in SYSTEMS:
        if name in tops:
            result[name] = {
                f"recall@{k}": recall_at_k(tops[name][0], setup.engaged, k)
                for k in RECALL_KS
                if k <= k_max
            }
    return result


def split_pairs(data: PreprocessLayout, split: str, n_posts: int) -> np.ndarray:
    """Sorted unique ``user_id * n_posts + post_id`` of the rows of ``split`` (int64 [K])."""
    table = pq.read_table(data.examples(split), columns=["user_id", "post_id"])
    users = table.column("user_id").to_numpy().astype(np.int64)
    return np.unique(users * n_posts + table.column("post_id").to_numpy())


def _posts_of(keys: np.ndarray, user: int, n_posts: int) -> np.ndarray:
    """The posts of ``user`` among sorted pair keys."""
    lo, hi = np.searchsorted(keys, [user * n_posts, (user + 1) * n_posts])
    return keys[lo:hi] - user * n_posts


def _full_ranking(
    setup: _RetrievalSetup,
    seen: list[np.ndarray],
    tops: dict[str, tuple[np.ndarray, np.ndarray]],
    ks: tuple[int, ...],
) -> dict[str, Any]:
    """Recall, NDCG, MRR and Hit @K over every eligible post, never ranking a post the user
    interacted with in the training split (``seen``, per user).

    Relevant: the user's engaged test posts minus those training interactions; users left with
    none are skipped. Relevant posts outside the eligible corpus stay relevant (misses for
    every system); ``relevant_outside_corpus`` gives their share.
    """
    relevant = [np.setdiff1d(e, s) for e, s in zip(setup.engaged, seen, strict=True)]
    in_corpus = [np.isin(r, setup.corpus) for r in relevant]
    n_relevant = sum(len(r) for r in relevant)
    result: dict[str, Any] = {
        "users": int(sum(1 for r in relevant if len(r))),
        "corpus": len(setup.corpus),
        "k": list(ks),
        "excluded": "each user's training-split interactions",
        "excluded_pairs": int(sum(len(s) for s in seen)),
        "relevant_outside_corpus": (
            float(1 - sum(int(m.sum()) for m in in_corpus) / n_relevant) if n_relevant else 0.0
        ),
    }
    for name in SYSTEMS:
        if name in tops:
            result[name] = ranking_metrics(tops[name][1], relevant, ks)
    return result


def _retrieval_day(meta: dict[str, Any]) -> int:
    """The day whose snapshot retrieval is evaluated on (older runs: the first test day)."""
    return int(meta.get("retrieval_day", min(meta["test_days"])))


def _load_truth(
    world: WorldLayout, meta: dict[str, Any], test: dict[str, np.ndarray]
) -> dict[str, np.ndarray] | None:
    """The ground-truth columns aligned with the test rows; None without a ground truth."""
    if not world.has_truth:
        return None
    truth_table = pads.dataset(world.truth_impressions, partitioning="hive").to_table(
        filter=pads.field("day").isin(meta["test_days"])
    )
    truth_cols = columns_from_arrow(truth_table)
    order = np.argsort(truth_cols["impression_id"])
    ids = truth_cols["impression_id"]
    at = np.searchsorted(ids, test["impression_id"], sorter=order)
    pos = order[np.minimum(at, max(len(ids) - 1, 0))] if len(ids) else at
    missing = int((ids[pos] != test["impression_id"]).sum()) if len(ids) else len(pos)
    if missing:  # e.g. live traffic in a test day: no simulated truth, so no oracle metrics
        logger.warning(
            "%d of %d test rows have no ground truth in %s: oracle metrics are left out",
            missing,
            len(pos),
            world.truth_impressions,
        )
        return None
    return {k: v[pos] for k, v in truth_cols.items()}


def evaluate(cfg: EvaluationConfig) -> dict[str, Any]:
    """Compute all metrics, write ``metrics.json`` and ``report.html`` into ``cfg.out_dir``."""
    from feedrec.evaluation.report import write_report

    data = PreprocessLayout(Path(cfg.data_dir))
    world = WorldLayout(Path(cfg.world_dir))
    meta = data.read_meta()
    test = columns_from_arrow(pq.read_table(data.examples("test")))
    truth = _load_truth(world, meta, test)
    gt = GroundTruth.load(world.latent) if truth is not None else None

    ranker_art, tower_art = load_artifact(cfg.ranker_dir), load_artifact(cfg.two_tower_dir)
    ranker = RankerPredictor.from_artifact(ranker_art)
    encoder = TowerEncoder.from_artifact(tower_art)
    world_cfg = load_world_config(world)
    day = _retrieval_day(meta)
    all_tables = FeatureTables.load(data.tables)
    tables = all_tables.snapshot(day)
    tower_transform = FeatureTransform(tower_art.vocabs)
    lifetime = world_cfg.post_lifetime_days
    train_pairs = split_pairs(data, "train", tables.attrs.n_posts)
    setup = _retrieval_setup(cfg, test, tables, encoder, tower_transform, gt, lifetime, day)
    seen = [_posts_of(train_pairs, int(u), tables.attrs.n_posts) for u in setup.users]
    k_recall = min(max(RECALL_KS), len(setup.corpus))
    k_full = min(max(FULL_RANKING_KS), len(setup.corpus))
    tops = _tops(setup, seen, k_recall, k_full)
    references = _truth_references(world, all_tables, test, lifetime) if truth is not None else {}
    metrics = {
        "ranking": _ranking(test, truth, ranker, FeatureTransform(ranker_art.vocabs), references),
        "retrieval": _retrieval(setup, tops, k_recall),
        "full_ranking": _full_ranking(
            setup, seen, tops, tuple(k for k in FULL_RANKING_KS if k <= k_full)
        ),
        "oracle": (
            {"available": True}
            if truth is not None
            else {"available": False, "reason": f"no ground truth in {world.root} (imported logs)"}
        ),
        "split": meta.get("split", {"kind": "time"}),
        "training": {
            "ranker": ranker_art.metadata["history"],
            "two_tower": tower_art.metadata["history"],
        },
        "test_days": meta["test_days"],
    }
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_report(metrics, out / "report.html")
    return metrics
