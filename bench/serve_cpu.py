"""Where a feed request's CPU goes: per-process CPU time per request, Serve chain and twin.

    python -m bench.serve_cpu --run-dir runs/serve1m --rps 20 --seconds 20

Starts the same stack and twin as ``bench/serve.py``, warms both up, then offers each the same
fixed load in turn and reads every process's CPU time (user + system) before and after. The
difference, divided by the requests answered, is printed per process group (Serve proxy,
Ingress and Retrieval replicas, Triton, Ray's own daemons, the twin, the load generator).
This explains a ratio in ``bench/results/serve.json``; it is not a target, so nothing is
written.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.serve import chain_stack, offered_load, server_arguments, servers, warm_up

# (group, substring of the process's command line), first match wins.
_GROUPS = (
    ("Ingress replicas", "ServeReplica:feed:Ingress"),
    ("Retrieval replicas", "ServeReplica:feed:Retrieval"),
    ("Serve proxy", "ProxyActor"),
    ("HAProxy", "haproxy"),
    ("Serve controller", "ServeController"),
    ("twin", "bench.serve_twin"),  # before Triton: its command line names --triton-url
    ("Triton", "triton"),
    ("Ray daemons", "ray"),
)


_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _group(cmd: str, pid: int) -> str | None:
    if pid == os.getpid():
        return "load generator"
    for name, needle in _GROUPS:
        if needle in cmd:
            return name
    return None


def cpu_by_group() -> dict[str, float]:
    """Seconds of CPU (user + system) used so far, summed per process group (Linux /proc)."""
    totals: dict[str, float] = defaultdict(float)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        group = _group(cmd, int(entry.name))
        if group is None:
            continue
        # Fields after the ")" closing the command name: utime and stime are the 12th and 13th.
        fields = stat[stat.rindex(")") + 2 :].split()
        totals[group] += (int(fields[11]) + int(fields[12])) * _TICK_S
    return totals


def measure(url: str, users: np.ndarray, rps: float, seconds: float, count: int) -> None:
    before = cpu_by_group()
    r = asyncio.run(offered_load(url, rps, seconds, users, count, seed=7))
    after = cpu_by_group()
    answered = r.requests - r.errors
    print(
        f"  {r.requests} requests at {rps} req/s: p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, "
        f"errors {r.errors}, fallbacks {r.fallbacks}"
    )
    total = 0.0
    for group in sorted(after, key=lambda g: -(after[g] - before.get(g, 0.0))):
        ms = (after[group] - before.get(group, 0.0)) * 1e3 / max(answered, 1)
        total += ms
        print(f"  {group:20} {ms:7.2f} ms CPU / request")
    print(f"  {'all':20} {total:7.2f} ms CPU / request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/serve1m"))
    parser.add_argument("--rps", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    server_arguments(parser)
    parser.add_argument("--rounds", type=int, default=1, help="measurements per side, in turns")
    args = parser.parse_args()
    if not (args.run_dir / "models").is_dir():
        parser.error(f"--run-dir {args.run_dir}: no trained models")

    from feedrec.runtime import RunLayout
    from feedrec.serving.online_store import OnlineFeatureStore

    run = RunLayout(args.run_dir.resolve())
    users = np.arange(OnlineFeatureStore.load(run.data, run.world).attrs.n_users)
    overrides: dict[str, object] = {"retrieve_k": args.retrieve_k, "rank_k": args.rank_k}
    with servers(chain_stack(run, args, overrides), run, args, overrides) as urls:
        for url in urls:
            warm_up(url, users, args.count)
        for _ in range(args.rounds):
            for label, url in zip(("Serve chain", "twin"), urls, strict=True):
                print(f"{label} ({url}):", flush=True)
                measure(url, users, args.rps, args.seconds, args.count)


if __name__ == "__main__":
    main()
