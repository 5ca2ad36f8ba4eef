"""LatencyPolicy inside a real Serve controller: a replica's ``record_autoscaling_stats`` p99
reaches the policy through Serve's custom-metrics path and scales the deployment up, with no
ongoing requests at all (Serve's default rule would keep one replica)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest
import ray
from ray import serve

from feedrec.serving.latency_window import COUNT_METRIC, P99_METRIC


@serve.deployment(ray_actor_options={"num_cpus": 0.01})
class Reporting:
    """Reports a fixed p99 over 500 requests, as an Ingress replica's window would."""

    def __init__(self, p99_ms: float) -> None:
        self.p99_ms = p99_ms

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {P99_METRIC: self.p99_ms, COUNT_METRIC: 500.0}

    def __call__(self) -> str:
        return "ok"


AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "upscale_delay_s": 0,
    "downscale_delay_s": 600,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "policy": {
        "policy_function": "feedrec.serving.latency_policy:LatencyPolicy",
        "policy_kwargs": {"target_p99_ms": 100, "settle_s": 0},
    },
}
APPS = {"latency_slow": 250.0, "latency_fast": 50.0}


@pytest.fixture
def reporting_apps(ray_cluster: None) -> Iterator[None]:
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        started = False
    except ValueError:  # no Serve on this cluster yet: start it, on a free port, and stop it
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = True
    try:
        for name, p99 in APPS.items():
            app = Reporting.options(autoscaling_config=AUTOSCALING).bind(p99)
            serve.run(app, name=name, route_prefix=None)
        yield
    finally:
        if started:
            serve.shutdown()  # seconds; deleting an ingress app drains it for 30 s first
        else:
            for name in APPS:
                serve.delete(name, _blocking=False)


def _running(app: str) -> int:
    status = serve.status().applications[app].deployments["Reporting"]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.mark.slow
def test_a_replica_reported_p99_over_target_scales_the_deployment(reporting_apps: None) -> None:
    deadline = time.monotonic() + 90
    while _running("latency_slow") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _running("latency_slow") == 2, serve.status().applications["latency_slow"]
    # The same deployment reporting p99 50 ms, given at least as long, stays at one replica.
    time.sleep(3)
    assert _running("latency_fast") == 1
