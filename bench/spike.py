"""Traffic spike: a 10x step in offered load for 60 s against the autoscaled Serve chain.

    make bench-spike      # = python -m bench.spike --run-dir runs/demo (3 -> 30 req/s), then
                          #   --base 6 --name spike_overload (6 -> 60 req/s: past capacity)

Open-loop arrivals at ``--base`` RPS, then 10x that for 60 s, then ``--base`` again, while a
thread samples Serve's running replicas per deployment every second. Prints p50/p99 before,
during and after the step, the status codes (anything but 200, or 503 with ``Retry-After``
from the Ingress's backpressure, counts as an error), how many requests were shed, how long
p99 took to come back under 100 ms after the first scale-up, and plots latency, answered and
shed requests and replicas over time to ``bench/results/<name>.png``. Results go to the
``<name>`` section (``--name``, default ``spike``) of ``bench/results/serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
P99_TARGET_MS = 100.0
WINDOW_S = 5.0


async def schedule(
    url: str, phases: list[tuple[float, float]], users: np.ndarray, count: int
) -> list[tuple[float, float, int, bool]]:
    """Open-loop load over ``phases`` of (rps, seconds): (start s, latency ms, status,
    whether the answer had a ``Retry-After`` header) per request; status 0 = no answer
    (timeout or connection error)."""
    rng = np.random.default_rng(0)
    starts: list[float] = []
    t = 0.0
    for rps, seconds in phases:
        n = int(rps * seconds)
        starts += [t + i / rps for i in range(n)]
        t += seconds
    out: list[tuple[float, float, int, bool]] = []
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:

        async def one(at: float, user: int) -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/feed", json={"user_id": user, "count": count})
                retry_after = "retry-after" in r.headers
                out.append((at, (time.perf_counter() - t0) * 1e3, r.status_code, retry_after))
            except httpx.HTTPError:
                out.append((at, (time.perf_counter() - t0) * 1e3, 0, False))

        begin = time.perf_counter()
        tasks = []
        for at, user in zip(starts, rng.choice(users, len(starts)), strict=True):
            delay = begin + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at, int(user))))
        await asyncio.gather(*tasks)
    return sorted(out)


def sample_replicas(app: str, stop: threading.Event, out: list[dict[str, float]]) -> None:
    """Every second: elapsed s, RUNNING replicas per deployment of ``app`` and, under
    ``"<deployment> starting"``, those being started (a starting replica loads its tables and
    models: on a small machine that CPU comes out of the serving replicas' share)."""
    from ray import serve

    t0 = time.perf_counter()
    while not stop.is_set():
        status = serve.status().applications.get(app)
        if status is not None:
            row: dict[str, float] = {"t": time.perf_counter() - t0}
            for name, dep in status.deployments.items():
                states = {str(s): n for s, n in dep.replica_states.items()}
                row[name] = states.get("RUNNING", 0)
                row[f"{name} starting"] = states.get("STARTING", 0)
            out.append(row)
        stop.wait(1.0)


def _shed(record: tuple[float, float, int, bool]) -> bool:
    """Backpressure is an answer, not an error, only when it tells the client when to retry:
    a 503 with ``Retry-After``."""
    _, _, code, retry_after = record
    return code == 503 and retry_after


def _window_stats(
    records: list[tuple[float, float, int, bool]], end: float
) -> list[dict[str, float]]:
    """Per ``WINDOW_S`` window of send times: p50/p99 of the answered requests, how many were
    answered and how many were shed (:func:`_shed`)."""
    rows = []
    for lo in np.arange(0.0, end, WINDOW_S):
        window = [r for r in records if lo <= r[0] < lo + WINDOW_S]
        lat = [ms for _, ms, code, _ in window if code == 200]
        if lat:
            rows.append(
                {
                    "t": float(lo),
                    "p50_ms": float(np.percentile(lat, 50)),
                    "p99_ms": float(np.percentile(lat, 99)),
                    "n": len(lat),
                    "shed": sum(map(_shed, window)),
                }
            )
    return rows


def recovery_after_scale_up(
    windows: list[dict[str, float]], first_up: float | None, step_end: float
) -> tuple[float | None, float | None]:
    """Seconds from the first scale-up (``first_up``, s since the start) to the end of the first
    later window whose p99 is under target: ``(under the step's load, under any load)``.

    The first counts only windows that end by ``step_end``: a p99 that recovers once the offered
    load drops back has not been brought back by the scale-up, so it does not meet the goal.
    ``None``: no scale-up, or no such window."""
    if first_up is None:
        return None, None
    start = first_up
    later = [w for w in windows if w["t"] >= start and w["p99_ms"] <= P99_TARGET_MS]
    under_load = [w for w in later if w["t"] + WINDOW_S <= step_end]

    def seconds(ws: list[dict[str, float]]) -> float | None:
        return ws[0]["t"] + WINDOW_S - start if ws else None

    return seconds(under_load), seconds(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--base", type=float, default=3.0, help="RPS before and after the step")
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--spike-seconds", type=float, default=60.0)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--name", default="spike", help="section of serve.json and name of the plot (.png)"
    )
    parser.add_argument(
        "--serve-config",
        type=Path,
        default=None,
        help="a serve deploy YAML instead of apps/feed_service/serve_config.yaml (e.g. to "
        "run a baseline with another autoscaling policy)",
    )
    args = parser.parse_args()
    if not args.name.isidentifier():
        parser.error(f"--name {args.name!r}: letters, digits and _ only")
    if not (args.run_dir / "models").is_dir():
        parser.error(f"--run-dir {args.run_dir}: no trained models (run `make demo` first)")

    from feedrec.runtime import RunLayout
    from feedrec.serving.config import deployment_options
    from feedrec.serving.online_store import OnlineFeatureStore
    from feedrec.serving.stack import APP_NAME, ServingStack, StackConfig

    run = RunLayout(args.run_dir.resolve())
    users = np.arange(OnlineFeatureStore.load(run.data, run.world).attrs.n_users)
    before, after = 20.0, 60.0
    phases = [
        (args.base, before),
        (args.base * args.factor, args.spike_seconds),
        (args.base, after),
    ]
    replicas: list[dict[str, float]] = []
    stop = threading.Event()
    stack = StackConfig(run_dir=run.root, http_port=args.port, export_portable=False)
    if args.serve_config is not None:
        stack = dataclasses.replace(stack, serve_config=args.serve_config.resolve())
    ingress = deployment_options(stack.serve_config, APP_NAME).get("Ingress", {})
    policy = (ingress.get("autoscaling_config") or {}).get("policy") or {}
    with ServingStack(stack):
        sampler = threading.Thread(target=sample_replicas, args=(APP_NAME, stop, replicas))
        sampler.start()
        try:
            records = asyncio.run(
                schedule(f"http://127.0.0.1:{args.port}", phases, users, args.count)
            )
        finally:
            stop.set()
            sampler.join()
    end = before + args.spike_seconds + after
    codes = Counter(code for _, _, code, _ in records)
    shed = sum(map(_shed, records))
    errors = len(records) - codes[200] - shed

    def pct(lo: float, hi: float, q: float) -> float | None:
        lat = [ms for at, ms, code, _ in records if lo <= at < hi and code == 200]
        return round(float(np.percentile(lat, q)), 1) if lat else None

    windows = _window_stats(records, end)
    deployments = sorted({k for row in replicas for k in row if k != "t" and "starting" not in k})
    first_up = next(
        (row["t"] for row in replicas if any(row[d] > replicas[0].get(d, 1) for d in deployments)),
        None,
    )
    recovered, recovered_any = recovery_after_scale_up(
        windows, first_up, before + args.spike_seconds
    )
    spike = {
        "serve_config": str(stack.serve_config),
        "ingress_autoscaling_policy": policy.get("policy_function", "Serve's default"),
        "base_rps": args.base,
        "spike_rps": args.base * args.factor,
        "spike_seconds": args.spike_seconds,
        "p99_before_ms": pct(0, before, 99),
        "p99_during_ms": pct(before, before + args.spike_seconds, 99),
        "p99_after_ms": pct(before + args.spike_seconds + 10, end, 99),
        "p50_during_ms": pct(before, before + args.spike_seconds, 50),
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
        "shed_with_retry_after": shed,
        "shed_during": sum(
            _shed(r) for r in records if before <= r[0] < before + args.spike_seconds
        ),
        "errors": errors,
        "first_scale_up_s": None if first_up is None else round(first_up, 1),
        "p99_back_under_target_s_after_scale_up": None
        if recovered is None
        else round(recovered, 1),
        "p99_back_under_target_s_after_scale_up_any_load": None
        if recovered_any is None
        else round(recovered_any, 1),
        "max_replicas": {d: max(row.get(d, 0) for row in replicas) for d in deployments},
        "first_start_s": next(
            (
                round(row["t"], 1)
                for row in replicas
                if any(row.get(f"{d} starting", 0) for d in deployments)
            ),
            None,
        ),
        "windows": windows,
        "replicas": replicas,
    }
    print(
        json.dumps({k: v for k, v in spike.items() if k not in ("windows", "replicas")}, indent=2)
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax3, ax2) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ts = [w["t"] + WINDOW_S / 2 for w in windows]
    ax1.plot(ts, [w["p99_ms"] for w in windows], label="p99")
    ax1.plot(ts, [w["p50_ms"] for w in windows], label="p50")
    ax1.axhline(P99_TARGET_MS, color="grey", ls="--", lw=1, label="100 ms target")
    ax1.axvspan(before, before + args.spike_seconds, color="orange", alpha=0.15, label="10x load")
    ax1.set_ylabel("latency (ms, 5 s windows)")
    ax1.set_yscale("log")
    ax1.legend(loc="upper right")
    ax3.plot(ts, [w["n"] / WINDOW_S for w in windows], label="answered 200")
    ax3.plot(ts, [w["shed"] / WINDOW_S for w in windows], label="shed: 503 + Retry-After")
    ax3.axvspan(before, before + args.spike_seconds, color="orange", alpha=0.15)
    ax3.set_ylabel("requests/s (by send time)")
    ax3.legend(loc="upper right")
    for d in deployments:
        times = [r["t"] for r in replicas]
        line = ax2.step(times, [r.get(d, 0) for r in replicas], where="post", label=d)[0]
        starting = [r.get(d, 0) + r.get(f"{d} starting", 0) for r in replicas]
        if any(r.get(f"{d} starting", 0) for r in replicas):
            ax2.step(
                times,
                starting,
                where="post",
                ls=":",
                color=line.get_color(),
                label=f"{d} incl. starting",
            )
    ax2.axvspan(before, before + args.spike_seconds, color="orange", alpha=0.15)
    ax2.set_ylabel("running replicas")
    ax2.set_xlabel("seconds")
    ax2.legend(loc="upper right")
    fig.suptitle(f"feed service, {args.base:g} -> {args.base * args.factor:g} RPS step (2 cores)")
    fig.tight_layout()
    plot = RESULTS / f"{args.name}.png"
    fig.savefig(plot, dpi=100)
    results_file = RESULTS / "serve.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    results[args.name] = spike
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {results_file} ({args.name}) and {plot}")


if __name__ == "__main__":
    main()
