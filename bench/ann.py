"""Approximate nearest neighbours: the index sweep on 1M x 64 vs exact (flat) search.

    make bench-ann        # = python -m bench.ann --posts 1000000 --dim 64

The corpus is a mixture of 2,000 Gaussian clusters on the unit sphere (item-tower embeddings
are clustered by topic and creator; uniform random vectors, which have no neighbourhood
structure, are a worst case no production index is tuned for). Queries come from the same
mixture. The sweep (``feedrec.retrieval.index_sweep``, the one the index job runs) picks the
fastest index/parameter with recall@100 >= 0.95; this prints the curve and writes the ``ann``
section of ``bench/results/serve.json``:
``{"recall_at_100", "qps", "exact_qps", "speedup", "index", "params", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


def clustered_unit_vectors(
    n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator
) -> np.ndarray:
    """float32 [n, dim]: unit vectors around ``clusters`` random centres (noise ``spread``)."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 200_000):  # in chunks: bounded temporary memory
        m = min(200_000, n - s)
        x = centres[rng.integers(0, clusters, m)]
        x += spread * rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--spread", type=float, default=1.0)
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("posts", "dim", "queries", "clusters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")

    from feedrec.retrieval.index_sweep import fastest_reaching, sweep_index

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x = clustered_unit_vectors(args.posts, args.dim, args.clusters, args.spread, rng)
    q = clustered_unit_vectors(args.queries, args.dim, args.clusters, args.spread, rng)
    print(f"corpus {x.shape}, queries {q.shape}, target recall@100 >= {args.target_recall}")
    result = sweep_index(x, q, k=100, target_recall=args.target_recall, progress=True)
    c = result.chosen
    print(f"exact (Flat): {result.exact_qps:,.0f} QPS")
    print(
        f"chosen: {c.factory} {c.params}: recall@100 {c.recall:.4f}, {c.qps:,.0f} QPS, "
        f"{result.speedup:.1f}x exact (goal >= 20x), built in {c.build_s:.0f} s"
    )
    # GPU faiss has no fast-scan codes: a GPU deployment searches IVF-Flat, so its best
    # point at the target is kept too (the capacity plan sizes GPUs from it).
    flats = [p for p in result.points if p.factory.endswith(",Flat")]
    flat = fastest_reaching(flats, args.target_recall)
    ann = {
        "recall_at_100": round(c.recall, 4),
        "qps": round(c.qps, 1),
        "exact_qps": round(result.exact_qps, 1),
        "speedup": round(result.speedup, 2),
        "index": c.factory,
        "params": c.params,
        "corpus": {
            "posts": args.posts,
            "dim": args.dim,
            "queries": args.queries,
            "clusters": args.clusters,
            "spread": args.spread,
        },
        "ivf_flat": None
        if flat is None
        else {
            "index": flat.factory,
            "params": flat.params,
            "recall_at_100": round(flat.recall, 4),
            "qps": round(flat.qps, 1),
        },
        "sweep": [p.to_dict() for p in result.points],
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["ann"] = ann
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
