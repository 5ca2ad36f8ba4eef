"""The whole debug pipeline, served for real: HTTP -> Ray Serve -> faiss -> Triton -> re-rank.

Also the train/serve contract: the features and scores the service computes for a (user, post)
pair equal the ones the offline (Ray Data) path computes.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from feedrec.artifacts import load_artifact
from feedrec.data import PreprocessLayout
from feedrec.data.examples import columns_from_arrow
from feedrec.features.tables import FeatureSnapshot, FeatureTables
from feedrec.features.transform import FeatureTransform
from feedrec.models.predictor import RankerPredictor
from feedrec.runtime import RunLayout
from feedrec.schema import RAW_COLUMNS, TASKS
from feedrec.serving.online_store import OnlineFeatureStore
from feedrec.serving.ranker_client import TritonRankerClient
from feedrec.serving.stack import ServingStack
from feedrec.training.trainer import ranker_columns


def _feed(stack: ServingStack, **body: object) -> httpx.Response:
    return httpx.post(f"{stack.url}/v1/feed", json=body, timeout=30)


def test_pipeline_wrote_every_stage(trained_run: Path) -> None:
    run = RunLayout(trained_run)
    for path in (
        run.world / "logs",
        run.data / "meta.json",
        run.ranker,
        run.two_tower,
        run.retrieval,
    ):
        assert path.exists(), path
    from feedrec import pipeline

    summary = pipeline.evaluate(run)
    assert "oracle" in summary and (run.eval / "report.html").stat().st_size > 10_000
    import json

    metrics = json.loads((run.eval / "metrics.json").read_text())
    for task in ("like", "comment", "share", "hide"):
        assert metrics["ranking"][task]["oracle"]["auc"] > 0.7  # the world is learnable
        ranked = metrics["ranking"][task]
        # Less of the truth ranks worse: without the latent taste, then with the interests
        # estimated from the logs; even that knows more than the posts' popularity.
        assert ranked["oracle"]["auc"] > ranked["oracle_no_taste"]["auc"]
        assert ranked["history_oracle"]["auc"] > ranked["popularity"]["auc"]
        assert ranked["model"]["auc_vs_history_oracle"] == pytest.approx(
            ranked["model"]["auc"] / ranked["history_oracle"]["auc"]
        )
    recall = {s: metrics["retrieval"][s]["recall@100"] for s in ("oracle", "history_oracle")}
    popularity = metrics["retrieval"]["popularity"]["recall@100"]
    # The truth ranks best; the truth as far as the logs show it still beats popularity.
    assert recall["oracle"] > popularity and recall["history_oracle"] > popularity
    assert "history_oracle" in summary


def test_health(stack: ServingStack) -> None:
    assert httpx.get(f"{stack.url}/healthz", timeout=5).json() == {"status": "ok"}


def test_feed_for_a_known_user_obeys_the_rules(stack: ServingStack, trained_run: Path) -> None:
    run = RunLayout(trained_run)
    store = OnlineFeatureStore.load(run.data, run.world)
    user = int(np.flatnonzero(np.diff(store.source.seen_indptr) > 0)[0])
    resp = _feed(stack, user_id=user, count=10, debug=True)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["fallback"] is False and body["cold_start"] is False
    assert body["model_version"] == load_artifact(run.ranker).version
    posts = np.array([item["post_id"] for item in body["items"]])
    assert 0 < len(posts) <= 10 and len(set(posts)) == len(posts)
    assert store.allowed(store.user(user), posts).all()  # no followed/hidden creators, nothing seen
    _, per_creator = np.unique(store.post_creator(posts), return_counts=True)
    assert per_creator.max() <= 2
    # Scores fall down the feed, except where a rule (fair slot, topic window) moved a post.
    items = body["items"]
    moved = ("fairness", "held back")
    by_value = [
        it["score"] for it in items if not any(m in r for r in it["reasons"] for m in moved)
    ]
    assert by_value == sorted(by_value, reverse=True)
    assert all(isinstance(it["reasons"], list) for it in items)
    assert set(items[0]["scores"]) == set(TASKS)
    debug = body["debug"]
    assert debug["candidates"] > 0
    assert set(debug["filtered"]) == {"followed", "seen", "hidden", "blocked"}
    assert debug["filtered"]["blocked"] == 0

    # Blocking the creators of that feed removes them, and says how many hits it filtered.
    blocked = sorted({int(c) for c in store.post_creator(posts)})
    again = _feed(stack, user_id=user, count=10, debug=True, blocked_creator_ids=blocked).json()
    creators_now = store.post_creator(np.array([it["post_id"] for it in again["items"]]))
    assert not set(creators_now.tolist()) & set(blocked)
    assert again["debug"]["filtered"]["blocked"] >= len(posts)
    plain = _feed(stack, user_id=user, count=10).json()
    assert plain["debug"] is None and all(it["reasons"] is None for it in plain["items"])


def test_unknown_user_gets_cold_start_feed(stack: ServingStack, trained_run: Path) -> None:
    run = RunLayout(trained_run)
    store = OnlineFeatureStore.load(run.data, run.world)
    body = _feed(stack, user_id=10**9, count=5).json()
    assert body["cold_start"] is True and len(body["items"]) == 5
    assert body["model_version"] == "cold-start" and body["fallback"] is False

    # Context shapes the feed: picked interests pull their topics up, and the reasons say so.
    topic = int(np.bincount(store.post_topic(store.popular[:100])).argmax())
    picked = _feed(
        stack, user_id=10**9, count=10, user_segment=0, interests=[topic], debug=True
    ).json()
    topics = store.post_topic(np.array([it["post_id"] for it in picked["items"]]))
    assert (topics == topic).sum() >= 1
    for it, t in zip(picked["items"], topics, strict=True):
        assert it["reasons"][0] == "cold start: trending in segment"
        assert ("cold start: matches interests" in it["reasons"]) == (t == topic)
    posts = np.array([it["post_id"] for it in picked["items"]])
    _, per_creator = np.unique(store.post_creator(posts), return_counts=True)
    assert per_creator.max() <= 2

    bad = _feed(stack, user_id=10**9, user_segment=store.n_segments)
    assert bad.status_code == 422 and "user_segment" in bad.text
    bad = _feed(stack, user_id=10**9, interests=[10**6])
    assert bad.status_code == 422 and "interests" in bad.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": -3}, "user_id"),
        ({"user_id": 1, "count": 1000}, "count"),
        ({"user_id": "abc"}, "user_id"),
        ({"count": 3}, "user_id"),
        ({"user_id": 1, "surprise": 1}, "surprise"),
        ({"user_id": 1, "blocked_creator_ids": "7"}, "blocked_creator_ids"),
        ({"user_id": 1, "blocked_creator_ids": list(range(1001))}, "blocked_creator_ids"),
    ],
)
def test_bad_requests_are_422_naming_the_field(stack: ServingStack, body: dict, field: str) -> None:
    resp = _feed(stack, **body)
    assert resp.status_code == 422
    assert field in resp.text


def test_malformed_json_is_4xx(stack: ServingStack) -> None:
    resp = httpx.post(
        f"{stack.url}/v1/feed",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert 400 <= resp.status_code < 500


def test_served_scores_equal_offline_scores(stack: ServingStack, trained_run: Path) -> None:
    """Serve path (online store + Triton) == offline path (full tables + eager model)."""
    run = RunLayout(trained_run)
    data = PreprocessLayout(run.data)
    day = data.read_meta()["serving_day"]
    store = OnlineFeatureStore.load(run.data, run.world)
    user = int(np.flatnonzero(np.diff(store.source.seen_indptr) > 0)[3])
    items = _feed(stack, user_id=user, count=8).json()["items"]
    posts = np.array([i["post_id"] for i in items])
    offline = FeatureTables.load(data.tables)
    n = len(posts)
    raw = offline.lookup(
        np.full(n, user), posts, np.full(n, day), np.full(n, float(day)), np.zeros(n)
    )
    artifact = load_artifact(run.ranker)
    expected = RankerPredictor.from_artifact(artifact).predict(
        FeatureTransform(artifact.vocabs)(raw, "ranker")
    )
    served = np.array([[i["scores"][t] for t in TASKS] for i in items])
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)


def test_train_path_and_serve_path_give_identical_tensors_and_scores(
    stack: ServingStack, trained_run: Path
) -> None:
    """Rows written by the Ray Data job vs the online store's lookup for the same impressions."""
    run = RunLayout(trained_run)
    data = PreprocessLayout(run.data)
    table = pq.read_table(data.examples("test")).slice(0, 200)
    offline_raw = columns_from_arrow(table)
    day = int(offline_raw["day"][0])
    online = FeatureSnapshot.load(data.tables, day)  # what a store serving that day holds
    online_raw = online.lookup(
        offline_raw["user_id"],
        offline_raw["post_id"],
        offline_raw["day"],
        offline_raw["ts"],
        offline_raw["position"],
    )
    for col in RAW_COLUMNS:
        np.testing.assert_array_equal(online_raw[col.name], offline_raw[col.name], col.name)
    artifact = load_artifact(run.ranker)
    transform = FeatureTransform(artifact.vocabs)
    train_batch = ranker_columns(transform, table)  # the exact function the trainer maps
    serve_inputs = transform(online_raw, "ranker")
    for name, value in serve_inputs.to_columns().items():
        np.testing.assert_array_equal(train_batch[name], value, name)
    client = TritonRankerClient(stack.triton.grpc_url)  # type: ignore[union-attr]
    triton = client.score_sync(serve_inputs.single_ids, serve_inputs.multi_ids, serve_inputs.dense)
    client.close_sync()
    eager = RankerPredictor.from_artifact(artifact).predict(serve_inputs)
    np.testing.assert_allclose(triton, eager, rtol=1e-5, atol=1e-6)


def test_prometheus_metrics_are_exported_through_ray(stack: ServingStack) -> None:
    """What the dashboard and alert rules (apps/feed_service/monitoring) read is scraped from
    Ray's metrics endpoint after real requests."""
    import time

    import ray

    for user in range(6):
        assert _feed(stack, user_id=user, count=5).status_code == 200
    assert _feed(stack, user_id=10**7, count=5).json()["cold_start"] is True
    assert _feed(stack, user_id=-1, count=5).status_code == 422
    port = ray.nodes()[0]["MetricsExportPort"]
    # (name, tags that one of its sample lines must carry; tag order is not fixed)
    want = [
        ("ray_feedrec_feed_requests_total", ['outcome="ok"']),
        ("ray_feedrec_feed_requests_total", ['outcome="cold_start"']),
        ("ray_feedrec_stage_latency_ms_bucket", ['stage="total"', 'le="100.0"']),
        ("ray_feedrec_candidates_bucket", ['stage="retrieved"']),
        ("ray_feedrec_prediction_mean_bucket", ['task="like"']),
        ("ray_feedrec_served_score_bucket", []),
        ("ray_feedrec_model_info", ["model_version="]),
        ("ray_serve_deployment_replica_healthy", ['deployment="Retrieval"']),
        ("ray_serve_num_http_requests_total", []),
        ("ray_serve_num_http_error_requests_total", ['error_code="422"']),
    ]

    def present(lines: list[str], name: str, tags: list[str]) -> bool:
        return any(
            line.startswith((name + "{", name + " ")) and all(t in line for t in tags)
            for line in lines
        )

    deadline, missing = time.monotonic() + 90, want
    while missing and time.monotonic() < deadline:
        time.sleep(2)  # Ray's agents report every few seconds
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        missing = [(name, tags) for name, tags in want if not present(lines, name, tags)]
    assert not missing, missing


def test_triton_down_serves_flagged_fallback_never_5xx(stack: ServingStack) -> None:
    # Runs last in this module: it stops Triton.
    assert stack.triton is not None
    stack.triton.stop()
    resp = _feed(stack, user_id=3, count=5, debug=True)
    assert resp.status_code == 200
    body = resp.json()
    assert body["fallback"] is True and len(body["items"]) == 5
