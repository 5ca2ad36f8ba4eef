"""Offline evaluation on the test days: model vs the world's oracle vs a popularity baseline."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from feedrec.artifacts import load_artifact
from feedrec.data.examples import columns_from_arrow
from feedrec.data.preprocess import PreprocessLayout
from feedrec.evaluation.metrics import auc, expected_calibration_error, logloss, recall_at_k
from feedrec.features.tables import FeatureTables
from feedrec.features.transform import FeatureTransform
from feedrec.models.batch import BINARY_TASKS
from feedrec.models.predictor import RankerPredictor, TowerEncoder
from feedrec.retrieval.post_index import PostIndex
from feedrec.world.generator import load_world_config
from feedrec.world.layout import WorldLayout
from feedrec.world.truth import GroundTruth

RECALL_KS = (10, 50, 100, 200, 500)
#: Pseudo-impressions of the popularity baseline's shrinkage towards the all-post rate.
POPULARITY_PRIOR = 20.0
_POPULARITY_COLUMN = {
    "like": "p_likes",
    "comment": "p_comments",
    "share": "p_shares",
    "hide": "p_hides",
}


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
    truth: dict[str, np.ndarray],
    predictor: RankerPredictor,
    transform: FeatureTransform,
) -> dict[str, Any]:
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
            "oracle": {
                "auc": auc(y, truth[f"p_{task}"]),
                "logloss": logloss(y, truth[f"p_{task}"]),
                "ece": expected_calibration_error(y, truth[f"p_{task}"]),
            },
            "popularity": {
                "auc": auc(y, popularity),
                "logloss": logloss(y, np.clip(popularity, 1e-4, 1 - 1e-4)),
            },
        }
        out[task]["model"]["auc_vs_oracle"] = out[task]["model"]["auc"] / out[task]["oracle"]["auc"]
    dwell = raw["dwell"]
    out["dwell"] = {
        "model": {"rmse": float(np.sqrt(np.mean((pred[:, -1] - dwell) ** 2)))},
        "oracle": {"rmse": float(np.sqrt(np.mean((truth["e_dwell"] - dwell) ** 2)))},
        "popularity": {
            "rmse": float(np.sqrt(np.mean((raw["p_dwell"] / (raw["p_imps"] + 1) - dwell) ** 2)))
        },
    }
    return out


def _retrieval(
    cfg: EvaluationConfig,
    raw: dict[str, np.ndarray],
    tables: FeatureTables,
    encoder: TowerEncoder,
    transform: FeatureTransform,
    gt: GroundTruth,
    lifetime: float,
) -> dict[str, Any]:
    """Recall@K of the test day's engaged posts among all posts eligible that day."""
    day = int(raw["day"].min())
    engaged = (raw["like"] + raw["comment"] + raw["share"]) > 0
    users_all = np.unique(raw["user_id"][engaged])
    rng = np.random.default_rng(cfg.seed)
    users = np.sort(rng.choice(users_all, size=min(cfg.max_users, len(users_all)), replace=False))
    relevant = [np.unique(raw["post_id"][engaged & (raw["user_id"] == u)]) for u in users]
    created = tables.attrs.post_created_at
    corpus = np.flatnonzero((created < day) & (created >= day - lifetime))
    k_max = min(max(RECALL_KS), len(corpus))

    index = PostIndex.build(
        encoder.items(transform(tables.attrs.post_columns(corpus), "item_tower")), corpus
    )
    user_raw = tables.user_columns(users, np.full(len(users), day))
    _, model_top = index.search(encoder.users(transform(user_raw, "user_tower")), k_max)

    ts = day + 0.5
    oracle_top = np.stack(
        [
            corpus[
                np.argsort(-gt.probabilities(np.full(len(corpus), u), corpus, ts)["like"])[:k_max]
            ]
            for u in users
        ]
    )
    popular = corpus[
        np.argsort(-tables.post[day - tables.first_day, corpus, 1], kind="stable")[:k_max]
    ]
    popularity_top = np.broadcast_to(popular, (len(users), k_max))
    result: dict[str, Any] = {"users": len(users), "corpus": len(corpus), "k": list(RECALL_KS)}
    for name, top in (("model", model_top), ("oracle", oracle_top), ("popularity", popularity_top)):
        result[name] = {
            f"recall@{k}": recall_at_k(top, relevant, k) for k in RECALL_KS if k <= k_max
        }
    return result


def evaluate(cfg: EvaluationConfig) -> dict[str, Any]:
    """Compute all metrics, write ``metrics.json`` and ``report.html`` into ``cfg.out_dir``."""
    from feedrec.evaluation.report import write_report

    data = PreprocessLayout(Path(cfg.data_dir))
    world = WorldLayout(Path(cfg.world_dir))
    meta = data.read_meta()
    test = columns_from_arrow(pq.read_table(data.examples("test")))
    truth_table = pads.dataset(world.truth_impressions, partitioning="hive").to_table(
        filter=pads.field("day").isin(meta["test_days"])
    )
    truth_cols = columns_from_arrow(truth_table)
    order = np.argsort(truth_cols["impression_id"])
    pos = order[np.searchsorted(truth_cols["impression_id"], test["impression_id"], sorter=order)]
    truth = {k: v[pos] for k, v in truth_cols.items()}

    ranker_art, tower_art = load_artifact(cfg.ranker_dir), load_artifact(cfg.two_tower_dir)
    ranker = RankerPredictor.from_artifact(ranker_art)
    encoder = TowerEncoder.from_artifact(tower_art)
    tables = FeatureTables.load(data.tables)
    world_cfg = load_world_config(world)
    metrics = {
        "ranking": _ranking(test, truth, ranker, FeatureTransform(ranker_art.vocabs)),
        "retrieval": _retrieval(
            cfg,
            test,
            tables,
            encoder,
            FeatureTransform(tower_art.vocabs),
            GroundTruth.load(world.latent),
            world_cfg.post_lifetime_days,
        ),
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
