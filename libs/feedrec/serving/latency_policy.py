"""A Ray Serve autoscaling policy that holds a p99 latency target as well as a queue target.

Serve's default policy sizes a deployment by ongoing requests per replica. On the 2-core box
that signal misses a whole band of load: at 45 req/s x 35 ms there is less than one ongoing
request per Ingress replica (target 4), yet p99 was 206 ms, from bursts on the shared cores
rather than from a queue; a queue target low enough to fire there would also fire at 30 req/s,
which two replicas serve with p99 58 ms. This policy asks for the larger of

- the replicas the ongoing-request target needs (Serve's default rule), and
- the replicas the p99 target needs: ``current x p99 / target`` (at most ``max_step`` x
  current) while the replicas' request-weighted p99 is over the target, ``current`` (hold: no
  downscale) while it is within ``hold_fraction`` of it, nothing otherwise.

The p99 comes from each replica's ``record_autoscaling_stats`` (``LatencyWindow``), and is
only trusted over at least ``min_requests`` requests: at a few requests per second a window's
p99 is its slowest request, and that must not keep replicas alive. While replicas it asked for
are still starting, the policy holds that count (both rules: their capacity is not in either
signal yet, and on a busy node each start slows the others); for ``settle_s`` after replicas
start, the latency rule holds instead of adding more (the old replicas' windows still hold the
slow requests that caused the scale-up).

Serve wraps the policy with the deployment's ``min_replicas``/``max_replicas``, scaling factors
and ``upscale_delay_s``/``downscale_delay_s``. Serve pickles this module by value into the
controller, so it imports nothing from feedrec at module level.

Config (``serve_config.yaml``)::

    autoscaling_config:
      policy:
        policy_function: feedrec.serving.latency_policy:LatencyPolicy
        policy_kwargs: {target_p99_ms: 100}
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

#: Names of the custom autoscaling metrics each replica reports (``LatencyWindow.stats``).
P99_METRIC = "latency_p99_ms"
COUNT_METRIC = "latency_requests"
logger = logging.getLogger("ray.serve")


class LatencyPolicy:
    """Callable autoscaling policy: ``policy(ctx) -> (desired replicas, state)``."""

    def __init__(
        self,
        target_p99_ms: float = 100.0,
        hold_fraction: float = 0.7,
        min_requests: int = 100,
        max_step: float = 2.0,
        settle_s: float = 10.0,
    ) -> None:
        if target_p99_ms <= 0:
            raise ValueError(f"target_p99_ms must be > 0, got {target_p99_ms}")
        if not 0 < hold_fraction <= 1:
            raise ValueError(f"hold_fraction must be in (0, 1], got {hold_fraction}")
        if min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {min_requests}")
        if max_step < 1:
            raise ValueError(f"max_step must be >= 1, got {max_step}")
        if settle_s < 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self.target_p99_ms = target_p99_ms
        self.hold_fraction = hold_fraction
        self.min_requests = min_requests
        self.max_step = max_step
        self.settle_s = settle_s

    @staticmethod
    def observed_p99(ctx: Any) -> tuple[float, float]:
        """(request-weighted mean of the running replicas' latest p99 in ms, requests in
        their windows); (0, 0) when no replica has reported."""
        raw = ctx.raw_metrics or {}
        p99s, counts = raw.get(P99_METRIC) or {}, raw.get(COUNT_METRIC) or {}
        total = weighted = 0.0
        for replica, series in p99s.items():
            count_series = counts.get(replica)
            if not series or not count_series:
                continue
            # The latest report: each is already a window over the replica's recent requests.
            p99 = max(series, key=lambda point: point.timestamp).value
            n = max(count_series, key=lambda point: point.timestamp).value
            total += n
            weighted += n * p99
        return (weighted / total if total else 0.0), total

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        current, target = ctx.current_num_replicas, ctx.target_num_replicas
        if current == 0:
            return target, {}
        now = ctx.current_time if ctx.current_time is not None else time.time()
        previous = ctx.policy_state or {}
        # When the running count last grew: the new replicas' windows fill from then on.
        grew_at = previous.get("grew_at")
        if current > previous.get("running", current):
            grew_at = now
        # Serve's default rule: current x (ongoing / (target ongoing x current)).
        by_requests = ctx.total_num_requests / ctx.config.get_target_ongoing_requests()
        p99, requests = self.observed_p99(ctx)
        state = {
            "running": current,
            "grew_at": grew_at,
            "p99_ms": round(p99, 1),
            "latency_requests": requests,
        }
        if target > current:
            # Replicas asked for are still starting: neither rule sees their capacity yet, and
            # each start takes CPU on a busy node, which fills the queues that the ongoing-request
            # rule then answers with more starts (2 -> 6 Ingress replicas in a 5 -> 50 req/s
            # step on the 2-core box, p99 2 s). Hold what was asked for until they run.
            return float(target), state
        if requests < self.min_requests:
            return by_requests, state
        # Replicas have just started: the p99 still holds the slow requests from before them.
        waiting = grew_at is not None and now - grew_at < self.settle_s
        if p99 > self.target_p99_ms and not waiting:
            by_latency = current * min(p99 / self.target_p99_ms, self.max_step)
            asked = math.ceil(by_latency)
            if asked > max(by_requests, current) and previous.get("asked") != asked:
                # Serve logs the upscale; this says why (it shows 0-1 ongoing requests).
                logger.info(
                    "%s: p99 %.0f ms over %.0f requests > target %.0f ms: asking for %d "
                    "replicas (%d running)",
                    ctx.deployment_name,
                    p99,
                    requests,
                    self.target_p99_ms,
                    asked,
                    current,
                )
            state["asked"] = asked
        elif p99 > self.hold_fraction * self.target_p99_ms or waiting:
            by_latency = float(current)
        else:
            by_latency = 0.0
        return max(by_requests, by_latency), state
