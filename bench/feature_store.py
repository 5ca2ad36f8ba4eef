"""The online-feature work of one feed request, embedded store vs Redis, side by side.

    python -m bench.feature_store --run-dir runs/demo      # make bench-features

Per request, exactly what the serve path does with the store: fetch the viewer once, the
user tower's columns, the filters over the retrieved hits, the ranker's columns for the
candidates (their statistics in one round trip). The same users and posts go to both stores,
one request after another in this process (no Serve, no Triton: the store alone). Redis is a
``redis-server`` this script starts on 127.0.0.1 (no persistence: publish rebuilds it) and
fills with ``RedisFeatureSource.publish``. Writes ``bench/results/feature_store.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import redis

RESULTS = Path(__file__).resolve().parent / "results" / "feature_store.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway ``redis-server`` on 127.0.0.1 -> its port; stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: apt-get install -y redis-server")
    port = _free_port()
    with tempfile.TemporaryDirectory() as root:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", root, "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def request_ms(store: Any, users: np.ndarray, hits: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """ms per request [N]: user fetch + tower columns + filters over hits [N, H] + ranker
    columns of ranked [N, R]."""
    out = np.zeros(len(users))
    for i, user_id in enumerate(users.tolist()):
        t0 = time.perf_counter()
        user = store.user(user_id)
        store.user_raw([user])
        store.allowed(user, hits[i])
        store.ranker_raw(user, ranked[i])
        out[i] = (time.perf_counter() - t0) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--retrieve-k", type=int, default=1000)
    parser.add_argument("--rank-k", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not (args.run_dir / "data" / "meta.json").is_file():
        parser.error(f"--run-dir {args.run_dir}: no preprocess output (run `make demo` first)")

    from feedrec.runtime import RunLayout
    from feedrec.serving.online_store import OnlineFeatureStore
    from feedrec.serving.redis_feature_source import RedisFeatureSource

    run = RunLayout(args.run_dir.resolve())
    t0 = time.perf_counter()
    embedded = OnlineFeatureStore.load(run.data, run.world)
    load_embedded_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    users = rng.integers(0, embedded.attrs.n_users, args.requests)
    pool = embedded.catalog.eligible
    hits = rng.choice(pool, (args.requests, min(args.retrieve_k, len(pool))))
    ranked = hits[:, : args.rank_k]
    with redis_server() as port:
        url = f"redis://127.0.0.1:{port}/0"
        report = RedisFeatureSource.publish(url, run.data, run.world)
        t0 = time.perf_counter()
        remote = OnlineFeatureStore.load(run.data, run.world, feature_store=url)
        load_redis_s = time.perf_counter() - t0
        memory = int(redis.Redis(port=port).info("memory")["used_memory"])
        for store in (embedded, remote):  # warm-up: imports, connection, caches
            request_ms(store, users[:20], hits[:20], ranked[:20])
        times = {}
        for name, store in (("embedded", embedded), ("redis", remote)):
            ms = request_ms(store, users, hits, ranked)
            times[name] = {
                "p50_ms": float(np.percentile(ms, 50)),
                "p99_ms": float(np.percentile(ms, 99)),
                "requests_per_s": float(len(ms) / (ms.sum() / 1e3)),
            }
    result = {
        "embedded": times["embedded"],
        "redis": times["redis"],
        "ratio": times["redis"]["requests_per_s"] / times["embedded"]["requests_per_s"],
        "workload": {
            "requests": args.requests,
            "retrieve_k": int(hits.shape[1]),
            "rank_k": int(ranked.shape[1]),
            "users": embedded.attrs.n_users,
            "posts": embedded.attrs.n_posts,
            "eligible": len(pool),
        },
        "publish": {
            "snapshot": report.snapshot,
            "users": report.users,
            "posts": report.posts,
            "creators": report.creators,
            "seconds": report.seconds,
            "redis_used_memory_mb": memory / 2**20,
        },
        "load_s": {"embedded": load_embedded_s, "redis": load_redis_s},
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    e, r = times["embedded"], times["redis"]
    print(
        f"per request (fetch viewer, tower columns, filters over {hits.shape[1]}, ranker "
        f"columns of {ranked.shape[1]}):\n"
        f"  embedded  p50 {e['p50_ms']:.2f} ms  p99 {e['p99_ms']:.2f} ms  "
        f"{e['requests_per_s']:.0f} req/s\n"
        f"  redis     p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  "
        f"{r['requests_per_s']:.0f} req/s\n"
        f"  ratio redis / embedded: {result['ratio']:.2f}x; Redis holds "
        f"{memory / 2**20:.0f} MB for {report.users} users, {report.posts} posts\n"
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
