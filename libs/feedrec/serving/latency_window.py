"""A sliding window of one replica's request latencies, reported to Serve's autoscaler."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np

# The names of the custom autoscaling metrics are the policy's: it is pickled by value into
# the Serve controller, so it owns them and this module imports them.
from feedrec.serving.latency_policy import COUNT_METRIC, P99_METRIC

__all__ = ["COUNT_METRIC", "P99_METRIC", "LatencyWindow"]


class LatencyWindow:
    """Latencies (ms) of the requests that finished in the last ``seconds``.

    ``add`` costs an append (and drops expired entries); ``stats`` sorts at most a window's
    worth (a few hundred floats) and runs once per Serve metrics push, not per request.
    """

    def __init__(self, seconds: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        self.seconds = seconds
        self._clock = clock
        self._entries: deque[tuple[float, float]] = deque()

    def _expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - self.seconds:
            self._entries.popleft()

    def add(self, ms: float) -> None:
        """Record one request that took ``ms`` milliseconds and finished now."""
        now = self._clock()
        self._entries.append((now, ms))
        self._expire(now)

    def stats(self) -> dict[str, float]:
        """``{P99_METRIC: p99 in ms (0 with no requests), COUNT_METRIC: requests}`` over the
        window: the dict ``record_autoscaling_stats`` returns (numbers only, every key always
        present, as Serve requires)."""
        self._expire(self._clock())
        if not self._entries:
            return {P99_METRIC: 0.0, COUNT_METRIC: 0.0}
        ms = np.fromiter((m for _, m in self._entries), dtype=np.float64, count=len(self._entries))
        return {P99_METRIC: float(np.percentile(ms, 99)), COUNT_METRIC: float(ms.size)}
