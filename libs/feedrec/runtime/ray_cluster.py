"""Connect to a Ray cluster, or start a local one bound to loopback."""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray._private import ray_constants

#: Logical CPUs of a local cluster. More than the 2 physical cores of a laptop on purpose: two
#: training workers at 1 CPU each would otherwise leave nothing for Ray Data and starve it.
LOCAL_LOGICAL_CPUS = 4

#: Environment of every Ray process that hosts Serve (controller, proxy, replicas), read when the
#: process imports Ray Serve. Ray's throughput-optimized mode: deployment handles call replicas
#: over gRPC, user code and the router run on the replica's main event loop (no thread hop per
#: call), request logs are buffered and not echoed to stderr, and the GC is frozen after
#: start-up. Minus its direct ingress, which has every Ingress replica listen on a port of its own
#: for an external load balancer: feedrec keeps Serve's proxy on the configured HTTP port.
#: Measured on the chain at 15 req/s (2 cores, runs interleaved): 65.9 ms of CPU per feed over
#: all processes on average, against 71.9 ms without (README, Serving in depth).
#: Set on a local cluster by :func:`init_ray`; ``cluster.yaml`` starts Ray with the same values.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def repo_root() -> Path:
    # libs/feedrec/runtime/ray_cluster.py -> repo root (apps/ and jobs/ live there)
    return Path(__file__).resolve().parents[3]


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a local loopback-only cluster.

    Workers get the repo's ``libs/`` and root on ``PYTHONPATH`` so that ``feedrec.*`` and the Serve
    app under ``apps/`` import the same way on a laptop and under ``ray job submit``.
    """
    if ray.is_initialized():
        return
    root = repo_root()
    pythonpath = os.pathsep.join(
        p for p in (str(root / "libs"), str(root), os.environ.get("PYTHONPATH", "")) if p
    )
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # A local cluster stays on loopback. Ray reads this switch when it is imported: without it,
    # it swaps 127.0.0.1 for the host's address and its agents and gRPC servers listen on all
    # interfaces. Child processes (raylet, agents, workers) read the environment variable; this
    # process imported Ray already, so its constant is set too.
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["PYTHONPATH"] = pythonpath
    for name, value in SERVE_ENV.items():  # an explicit setting in the environment wins
        os.environ.setdefault(name, value)
    ray.init(
        # "local": always a new cluster. Without it Ray joins the machine's "current" cluster
        # (/tmp/ray/ray_current_cluster), which a crashed driver of Ray's multi-node test
        # cluster leaves behind pointing at a dead head: the next tests failed to start Ray.
        address="local",
        num_cpus=num_cpus or max(LOCAL_LOGICAL_CPUS, os.cpu_count() or 1),
        # The dashboard hosts Ray's State API, which Ray Train's placement-group cleaner needs:
        # without it the workers' placement group of a stopped trial (Ray Tune) or a crashed
        # controller is never released and the next run waits for CPUs forever.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )
