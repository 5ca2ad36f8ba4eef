"""Capacity plan: hand-checked arithmetic, provenance of every number, clear errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from feedrec.cli import main
from feedrec.planning.capacity_plan import (
    BenchFileError,
    CapacityAssumptions,
    evaluate,
    load_measurements,
    plan_capacity,
    render_markdown,
)

SERVE = {
    "rps_at_p99_100ms": 10.0,
    "host": {"cpus": 2},
    "workload": {"retrieve_k": 100, "rank_k": 50},
    # The CPU pick (fast-scan) is faster than IVF-Flat; GPUs are sized from IVF-Flat.
    "ann": {
        "qps": 400.0,
        "recall_at_100": 0.96,
        "ivf_flat": {"qps": 100.0, "recall_at_100": 0.9},
        "corpus": {"posts": 256},
    },
}
TRAIN = {"ray_dmp_samples_per_s": 100.0, "host": {"cpus": 2}}

# Small numbers, chosen so every step below can be checked by hand.
SMALL = {
    "dau": 864_000,
    "requests_per_user_per_day": 10,
    "peak_to_average": 2,
    "impressions_per_request": 5,
    "retrieve_candidates": 200,
    "rank_candidates": 100,
    "ingress_cpu_share": 0.25,
    "retrieval_cpu_share": 0.25,
    "ranking_cpu_share": 0.5,
    "users": 2**20,
    "posts": 2**26,
    "user_dim": 8,
    "post_dim": 8,
    "serving_bytes_per_value": 2,
    "training_bytes_per_value": 4,
    "optimizer_bytes_per_row": 4,
    "index_posts": 4096,
    "index_bytes_per_vector": 2**20,
    "ann_cost_exponent": 0.5,
    "index_shard_gib": 1,
    "embedding_shard_gib": 0.5,
    "embedding_replicas": 2,
    "gpu_memory_gib": 2,
    "gpu_memory_usable": 0.5,
    "gpus_per_node": 1,
    "cpu_node_cpus": 8,
    "cpu_node_memory_gib": 1,
    "ranking_gpu_speedup": 10,
    "ann_gpu_speedup": 2,
    "training_gpu_speedup": 10,
    "training_scaling_efficiency": 0.5,
    "training_epochs": 1,
    "training_window_hours": 6,
    "target_utilisation": 0.5,
    "cpu_node_hour_usd": 1,
    "gpu_node_hour_usd": 10,
}


def _bench(tmp_path: Path, serve: Any = SERVE, train: Any = TRAIN) -> Path:
    for name, doc in (("serve.json", serve), ("train.json", train)):
        if doc is not None:
            (tmp_path / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return tmp_path


def test_hand_checked_plan(tmp_path: Path) -> None:
    plan = plan_capacity(CapacityAssumptions(**SMALL), load_measurements(_bench(tmp_path)))
    expected = {
        # 864,000 users x 10 = 8.64M req/day = 100 req/s on average, 200 at peak.
        "avg_rps": 100,
        "peak_rps": 200,
        # ingress: 10 req/s / 0.25 = 40 per replica, x 0.5 utilisation = 20 -> 10 replicas,
        # 20 cores, 3 nodes of 8 cores.
        "ingress_rps_per_replica": 40,
        "ingress_replicas": 10,
        "ingress_nodes": 3,
        # retrieval: 10 / 0.25 x 100 / 200 = 20 per replica -> 10 usable -> 20 replicas, 5 nodes.
        "retrieval_replicas": 20,
        "retrieval_nodes": 5,
        # ranking: 10 / 0.5 x 50 / 100 x 10 = 100 req/s per GPU -> 50 usable -> 4 GPUs.
        "ranking_rps_per_gpu": 100,
        "ranking_gpus": 4,
        # ANN: 4096 x 1 MiB = 4 GiB -> 4 shards of 1024 vectors; (1024 / 256)^0.5 = 2x a bench
        # query; 100 x 2 / 2 = 100 QPS per GPU -> 50 usable -> 4 replicas per shard -> 16 GPUs.
        "index_gib": 4,
        "index_shards": 4,
        "shard_query_cost": 2,
        "ann_replicas_per_shard": 4,
        "ann_gpus": 16,
        "ann_memory_gib": 16,
        # tables: (2^20 x 8 + 2^26 x 8) x 2 B = 2^24 + 2^30 B = 1.015625 GiB -> 3 shards of 0.5,
        # 2 copies -> 6 nodes. Training: x 4 B = 2.03125 GiB + (2^20 + 2^26) x 4 B = 0.25390625
        # GiB of optimizer state = 2.28515625 GiB over 1 usable GiB per GPU -> 3 GPUs.
        "embedding_gib_serving": 1.015625,
        "embedding_shards": 3,
        "embedding_nodes": 6,
        "embedding_gib_training": 2.28515625,
        "train_gpus_for_memory": 3,
        # training: 8.64M x 5 = 43.2M samples; 1000 samples/s per GPU x 0.5 x 6 h = 10.8M per
        # GPU in the window -> 4 GPUs, which take exactly 6 h.
        "samples_per_day": 43_200_000,
        "train_gpus_for_window": 4,
        "train_gpus": 4,
        "training_hours_per_day": 6,
        # cost per day: CPU nodes 3 + 5 + 6 at 1 USD/h x 24; GPUs 16 + 4 at 10 USD/h x 24;
        # training 4 GPUs x 6 h x 10.
        "cost_ingress": 72,
        "cost_retrieval": 120,
        "cost_embeddings": 144,
        "cost_ann": 3840,
        "cost_ranking": 960,
        "cost_training": 240,
        "cost_per_day": 5376,
    }
    got = {name: plan.value(name) for name in expected}
    assert got == pytest.approx(expected, rel=1e-12)
    drivers = [(q.name, round(share, 4)) for q, share in plan.cost_drivers()]
    assert drivers[:2] == [("cost_ann", round(3840 / 5376, 4)), ("cost_ranking", 0.1786)]


def test_every_number_says_where_it_came_from(tmp_path: Path) -> None:
    plan = plan_capacity(CapacityAssumptions(**SMALL), load_measurements(_bench(tmp_path)))
    doc = render_markdown(plan, "feedrec capacity")
    for q in plan.measurements:
        assert q.source.startswith(str(tmp_path)) and f"`{q.source}`" in doc
    for field_name in SMALL:
        assert f"- `{field_name}` = " in doc  # one assumption line each
    for section in plan.sections:
        for q in section.quantities:
            assert q.kind == "derived"
            assert f"| `{q.name}` |" in doc and q.source.replace("|", "\\|") in doc
    # measured -> ann_qps = 100 (the IVF-Flat point, not the CPU pick's 400), not the real
    # bench file's: nothing hard-coded
    assert "| `ann_qps` | 100 |" in doc


def test_formulas_only_name_known_quantities() -> None:
    assert evaluate("ceil(a / b) + max(a, 2) ** 2", {"a": 3.0, "b": 2.0}) == 11
    with pytest.raises(KeyError, match="no quantity named 'c'"):
        evaluate("a * c", {"a": 1.0})
    with pytest.raises(ValueError, match="unsupported"):
        evaluate("__import__('os')", {})


@pytest.mark.parametrize(
    ("serve", "train", "match"),
    [
        (None, TRAIN, r"serve\.json: not found \(run `make bench-serve`\)"),
        (SERVE, None, r"train\.json: not found \(run `make bench-train`\)"),
        ("{not json", TRAIN, r"serve\.json: not valid JSON"),
        (
            {k: v for k, v in SERVE.items() if k != "ann"},
            TRAIN,
            r"serve\.json: key 'ann\.ivf_flat\.qps' missing \(run `make bench-ann`\)",
        ),
        ({**SERVE, "rps_at_p99_100ms": "fast"}, TRAIN, r"'rps_at_p99_100ms' must be a number > 0"),
        (SERVE, {**TRAIN, "ray_dmp_samples_per_s": 0}, r"train\.json: key 'ray_dmp_samples_per_s'"),
        ({**SERVE, "host": 2}, TRAIN, r"serve\.json: key 'host\.cpus' missing"),
    ],
    ids=["no-serve", "no-train", "bad-json", "no-ann", "not-a-number", "zero", "not-a-dict"],
)
def test_bad_bench_files_name_file_and_key(
    tmp_path: Path, serve: Any, train: Any, match: str
) -> None:
    with pytest.raises(BenchFileError, match=match):
        load_measurements(_bench(tmp_path, serve, train))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"peak_to_average": 0.5}, r"CapacityAssumptions\.peak_to_average must be a number >= 1"),
        ({"target_utilisation": 1.5}, r"target_utilisation must be a number in \(0, 1\]"),
        ({"users": 1.5}, r"CapacityAssumptions\.users must be an int >= 1"),
        ({"rank_candidates": True}, r"rank_candidates must be an int >= 1"),
        ({"cpu_node_hour_usd": float("nan")}, r"cpu_node_hour_usd must be a number > 0"),
        ({"ranking_cpu_share": 0.6}, r"ingress_cpu_share \+ .* must sum to 1, got 1\.1"),
        ({"dau": 2**21}, r"dau \(2,097,152\) must be <= users"),
        ({"index_posts": 2**27}, r"index_posts .* must be <= posts"),
        ({"index_shard_gib": 1.5}, r"index_shard_gib \(1\.5\) must fit one GPU"),
        ({"embedding_shard_gib": 2}, r"embedding_shard_gib \(2\) must fit one CPU node"),
    ],
)
def test_bad_assumption_names_the_field(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CapacityAssumptions(**{**SMALL, **change})


def test_overrides_coerce_integral_floats_and_refuse_unknown_names() -> None:
    a = CapacityAssumptions.from_overrides({"index_posts": 2e9, "peak_to_average": 3})
    assert a.index_posts == 2_000_000_000 and isinstance(a.index_posts, int)
    assert a.peak_to_average == 3
    with pytest.raises(ValueError, match="unknown assumption 'peak_factor'"):
        CapacityAssumptions.from_overrides({"peak_factor": 3})


def test_cli_writes_the_document(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    out = tmp_path / "docs" / "capacity.md"
    sets = [x for k, v in SMALL.items() if k != "dau" for x in ("--set", f"{k}={v}")]
    args = ["capacity", "--dau", "864000", "--bench-dir", str(bench), "--out", str(out), *sets]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "ANN 4 shards x 4 = 16 GPUs" in res.output and f"wrote {out}" in res.output
    doc = out.read_text()
    assert doc.startswith("# Capacity plan: 864,000 daily active users")
    assert "feedrec capacity --dau 864000 --set requests_per_user_per_day=10" in doc
    assert "| `cost_per_day` | 5,376 | USD/day |" in doc


def test_cli_errors_name_the_problem(tmp_path: Path) -> None:
    bench = _bench(tmp_path)
    out = tmp_path / "capacity.md"
    run = CliRunner().invoke
    res = run(main, ["capacity", "--bench-dir", str(bench), "--out", str(out), "--set", "x=1"])
    assert res.exit_code == 2 and "unknown assumption 'x'" in res.output
    res = run(main, ["capacity", "--bench-dir", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 2 and "serve.json: not found" in res.output
    res = run(main, ["capacity", "--dau", "5", "--set", "dau=6", "--bench-dir", str(bench)])
    assert res.exit_code == 2 and "not both" in res.output
    assert not out.exists()
