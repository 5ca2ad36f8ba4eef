"""Bring your own logs end to end: a MovieLens-like CSV -> import -> preprocess -> train ->
evaluate, through the library on local Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from feedrec import pipeline
from feedrec.data import PreprocessConfig, PreprocessLayout, run_preprocess
from feedrec.data.log_import import ImportSpec, import_logs
from feedrec.data.preprocess import SPLITS
from feedrec.evaluation.evaluate import EvaluationConfig, evaluate
from feedrec.features.vocabulary import Vocabularies
from feedrec.runtime import RunLayout

N_INTERACTIONS = 20_000
N_USERS, N_ITEMS, N_DAYS = 500, 800, 30


def movielens_like(path: Path, seed: int = 0) -> None:
    """userId,movieId,rating,timestamp rows: 1-5 star ratings from user and item biases plus
    latent factors, heavy-tailed user activity and item popularity, sparse item ids, 30 days of
    epoch seconds."""
    rng = np.random.default_rng(seed)
    user_f, item_f = rng.standard_normal((N_USERS, 4)), rng.standard_normal((N_ITEMS, 4))
    user_bias, item_bias = rng.normal(0.0, 0.4, N_USERS), rng.normal(0.0, 0.6, N_ITEMS)
    activity = rng.lognormal(0.0, 1.0, N_USERS)
    popularity = 1.0 / (np.arange(N_ITEMS) + 10.0) ** 0.8
    users = rng.choice(N_USERS, N_INTERACTIONS, p=activity / activity.sum())
    items = rng.choice(N_ITEMS, N_INTERACTIONS, p=popularity / popularity.sum())
    affinity = (user_f[users] * item_f[items]).sum(axis=1) / 2.0
    noise = rng.normal(0.0, 0.7, N_INTERACTIONS)
    mean = 3.3 + user_bias[users] + item_bias[items] + affinity
    rating = np.clip(np.round(mean + noise), 1, 5)
    ts = 978_300_000 + rng.integers(0, N_DAYS * 86_400, N_INTERACTIONS)
    rows = np.stack([users + 1, items * 7 + 3, rating, ts], axis=1).astype(np.int64)
    np.savetxt(
        path, rows, fmt="%d", delimiter=",", header="userId,movieId,rating,timestamp", comments=""
    )


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> Path:
    """Imported (not generated) logs, preprocessed with the time split, both models trained."""
    root = tmp_path_factory.mktemp("byol")
    movielens_like(root / "ratings.csv")
    run = RunLayout(root / "run")
    columns = {
        "user_id": "userId",
        "item_id": "movieId",
        "timestamp": "timestamp",
        "label": "rating",
    }
    result = import_logs(
        ImportSpec(root / "ratings.csv", "csv", columns, run.world, thresholds={"label": 4.0})
    )
    assert result.rows == N_INTERACTIONS and result.n_days >= N_DAYS
    pipeline.preprocess(run)
    pipeline.train(run, "ranker", "debug")
    pipeline.train(run, "two_tower", "debug")
    return run.root


def _finite(values: dict[str, float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values.values())


def test_imported_logs_run_through_preprocess_train_and_evaluate(imported_run: Path) -> None:
    run = RunLayout(imported_run)
    meta = PreprocessLayout(run.data).read_meta()
    assert meta["split"]["kind"] == "time" and sum(meta["rows"].values()) == N_INTERACTIONS
    summary = pipeline.evaluate(run)
    assert "oracle: unavailable" in summary
    metrics = json.loads((run.eval / "metrics.json").read_text())
    assert metrics["oracle"]["available"] is False
    like = metrics["ranking"]["like"]
    assert "oracle" not in like and like["positives"] > 0
    assert _finite({s: like[s]["auc"] for s in ("model", "popularity")})
    for system in ("model", "popularity"):
        assert _finite(metrics["retrieval"][system])
        full = metrics["full_ranking"][system]
        assert _finite(full) and {"recall@10", "ndcg@10", "mrr@10", "hit@10"} <= set(full)
        assert all(0.0 <= v <= 1.0 for v in full.values())
    assert metrics["full_ranking"]["users"] > 0
    assert (run.eval / "report.html").stat().st_size > 10_000
    # serving's index builds on imported logs too: every item is eligible on the serving day
    assert "index: 800 posts" in pipeline.index(run)


def test_random_split_on_imported_logs(imported_run: Path, tmp_path: Path) -> None:
    run = RunLayout(imported_run)
    cfg = PreprocessConfig(run.world, tmp_path / "data", progress=False, split="random", seed=1)
    data = run_preprocess(cfg)
    meta = data.read_meta()
    assert meta["split"] == {"kind": "random", "ratios": [8.0, 1.0, 1.0], "seed": 1}
    assert meta["retrieval_day"] == meta["serving_day"]
    rows = {
        s: pq.read_table(data.examples(s), columns=["impression_id", "user_id"]) for s in SPLITS
    }
    ids = np.concatenate([rows[s].column("impression_id").to_numpy() for s in SPLITS])
    assert np.array_equal(np.sort(ids), np.arange(N_INTERACTIONS))  # each row in one split
    per_user = {
        s: np.bincount(rows[s].column("user_id").to_numpy(), minlength=N_USERS) for s in SPLITS
    }
    n = per_user["train"] + per_user["valid"] + per_user["test"]
    np.testing.assert_array_equal(per_user["train"], np.floor(n * 0.8 + 0.5))
    np.testing.assert_array_equal(
        per_user["valid"], np.floor(n * 0.9 + 0.5) - np.floor(n * 0.8 + 0.5)
    )
    vocab_users = Vocabularies.load(data.vocabularies)["user_id"].ids
    np.testing.assert_array_equal(vocab_users, np.flatnonzero(per_user["train"]))

    # The evaluation path of a random split (retrieval at the serving day). The models were
    # trained on the time split: this checks the protocol runs, not what the numbers mean.
    metrics = evaluate(
        EvaluationConfig(
            world_dir=run.world,
            data_dir=data.root,
            ranker_dir=run.ranker,
            two_tower_dir=run.two_tower,
            out_dir=tmp_path / "eval",
        )
    )
    assert metrics["split"]["kind"] == "random"
    assert metrics["full_ranking"]["corpus"] == 800 and _finite(metrics["full_ranking"]["model"])
