"""The Ingress's autoscaling: a replica's latency window and the p99-holding policy, run
through Ray Serve's own policy wrapper (bounds, delays, scaling factors) and context."""

from __future__ import annotations

from typing import Any

import pytest
from ray.serve._private.common import TimeStampedValue
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from feedrec.serving.latency_policy import LatencyPolicy
from feedrec.serving.latency_window import LatencyWindow

NOW = 1_000.0


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_window_reports_p99_and_count_of_the_last_seconds_only() -> None:
    clock = _Clock()
    window = LatencyWindow(seconds=10.0, clock=clock)
    assert window.stats() == {"latency_p99_ms": 0.0, "latency_requests": 0.0}
    for ms in range(1, 101):  # 1..100 ms at t = 0
        window.add(float(ms))
    stats = window.stats()
    assert stats["latency_requests"] == 100
    assert stats["latency_p99_ms"] == pytest.approx(99.01)
    clock.t = 5.0
    window.add(500.0)
    assert window.stats()["latency_requests"] == 101
    clock.t = 10.0  # the first hundred expire
    assert window.stats() == {"latency_p99_ms": 500.0, "latency_requests": 1.0}
    with pytest.raises(ValueError, match="seconds"):
        LatencyWindow(seconds=0)


def _decide(
    policy: LatencyPolicy,
    *,
    running: int,
    target: int | None = None,
    ongoing: float,
    p99_ms: float,
    requests: float,
    state: dict[str, Any] | None = None,
    max_replicas: int = 8,
) -> tuple[int, dict[str, Any]]:
    """One autoscaling tick of ``policy`` wrapped as Serve wraps it (no delays here) and bounded
    to 2..``max_replicas``: each of ``running`` replicas reports ``p99_ms`` over
    ``requests / running`` requests."""
    config = AutoscalingConfig(
        min_replicas=2,
        max_replicas=max_replicas,
        target_ongoing_requests=4,
        upscale_delay_s=0,
        downscale_delay_s=0,
    )
    replicas = [f"replica-{i}" for i in range(running)]

    def series(value: float) -> list[TimeStampedValue]:
        # An older report first: the policy must read the latest one.
        return [TimeStampedValue(NOW - 2, 1.0), TimeStampedValue(NOW, value)]

    raw = {
        "latency_p99_ms": {r: series(p99_ms) for r in replicas},
        "latency_requests": {r: series(requests / running) for r in replicas},
    }
    ctx = AutoscalingContext(
        deployment_id=None,  # type: ignore[arg-type]
        deployment_name="Ingress",
        app_name="feed",
        current_num_replicas=running,
        target_num_replicas=running if target is None else target,
        running_replicas=replicas,  # type: ignore[arg-type]
        total_num_requests=ongoing,
        total_queued_requests=0.0,
        aggregated_metrics=None,
        raw_metrics=raw,  # type: ignore[arg-type]
        capacity_adjusted_min_replicas=2,
        capacity_adjusted_max_replicas=max_replicas,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=NOW,
        config=config,
    )
    replicas, state = _apply_autoscaling_config(policy)(ctx)
    # The controller then bounds the decision (DeploymentAutoscalingState.apply_bounds).
    return max(2, min(max_replicas, replicas)), state


def test_a_p99_over_target_scales_up_where_ongoing_requests_do_not() -> None:
    # The 45 req/s band on the 2-core box: 1.6 ongoing requests in all (target 4 per replica)
    # but p99 206 ms. Serve's default rule alone keeps 2 replicas; the p99 rule asks for 4.
    policy = LatencyPolicy(target_p99_ms=100)
    replicas, state = _decide(policy, running=2, ongoing=1.6, p99_ms=206.0, requests=450)
    assert replicas == 4  # 2 x min(2.06, max_step 2)
    assert state["p99_ms"] == 206.0 and state["latency_requests"] == 450
    # ... and stays inside max_replicas.
    assert (
        _decide(policy, running=2, ongoing=1.6, p99_ms=206.0, requests=450, max_replicas=3)[0] == 3
    )
    # 130 ms: 2 x 1.3 -> 3 replicas, not a doubling.
    assert _decide(policy, running=2, ongoing=1.6, p99_ms=130.0, requests=450)[0] == 3


def test_a_p99_under_target_leaves_sizing_to_ongoing_requests() -> None:
    policy = LatencyPolicy(target_p99_ms=100)
    # 30 req/s, p99 58 ms (under 0.7 x target): Serve's rule, 2 replicas.
    assert _decide(policy, running=2, ongoing=1.0, p99_ms=58.0, requests=300)[0] == 2
    # Queued work still scales: 20 ongoing / 4 per replica = 5.
    assert _decide(policy, running=2, ongoing=20.0, p99_ms=58.0, requests=300)[0] == 5
    # Four replicas at p99 50 ms and little load: back down to the minimum.
    assert _decide(policy, running=4, ongoing=0.5, p99_ms=50.0, requests=400)[0] == 2


def test_a_p99_near_target_holds_the_fleet() -> None:
    # p99 80 ms with 4 replicas: within 0.7 x target, so no downscale (halving the fleet is
    # what pushed p99 over the target).
    policy = LatencyPolicy(target_p99_ms=100, hold_fraction=0.7)
    assert _decide(policy, running=4, ongoing=0.5, p99_ms=80.0, requests=400)[0] == 4


def test_a_p99_over_too_few_requests_is_not_trusted() -> None:
    # 3 req/s: the window's p99 is its slowest request; it must not scale up.
    policy = LatencyPolicy(target_p99_ms=100, min_requests=100)
    replicas, state = _decide(policy, running=2, ongoing=0.2, p99_ms=300.0, requests=30)
    assert replicas == 2 and state["latency_requests"] == 30


def test_replicas_still_starting_or_just_started_are_waited_for() -> None:
    policy = LatencyPolicy(target_p99_ms=100, settle_s=10.0)
    # 3 running of 4 asked for, p99 200 ms: hold 4 rather than ask for 3 x 2 = 6 ...
    assert _decide(policy, running=3, target=4, ongoing=1.0, p99_ms=200.0, requests=400)[0] == 4
    # ... and full queues (40 ongoing: 10 replicas by Serve's rule) wait for them as well.
    assert _decide(policy, running=3, target=4, ongoing=40.0, p99_ms=900.0, requests=400)[0] == 4
    # The running count grew 2 -> 4 just now: hold 4 while the windows refill ...
    replicas, state = _decide(
        policy, running=4, ongoing=1.0, p99_ms=200.0, requests=400, state={"running": 2}
    )
    assert replicas == 4 and state["grew_at"] == NOW
    # ... and still 5 s later ...
    later = {"running": 4, "grew_at": NOW - 5.0}
    assert _decide(policy, running=4, ongoing=1.0, p99_ms=200.0, requests=400, state=later)[0] == 4
    # ... but once settled, a p99 still over target scales again.
    settled = {"running": 4, "grew_at": NOW - 11.0}
    assert (
        _decide(policy, running=4, ongoing=1.0, p99_ms=200.0, requests=400, state=settled)[0] == 8
    )


def test_bad_policy_arguments_are_refused_naming_them() -> None:
    for kwargs, name in [
        ({"target_p99_ms": 0}, "target_p99_ms"),
        ({"hold_fraction": 1.5}, "hold_fraction"),
        ({"min_requests": 0}, "min_requests"),
        ({"max_step": 0.5}, "max_step"),
        ({"settle_s": -1}, "settle_s"),
    ]:
        with pytest.raises(ValueError, match=name):
            LatencyPolicy(**kwargs)
