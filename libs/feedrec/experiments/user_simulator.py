"""Simulated users of the live service, who behave as the synthetic world says people do.

Each simulated user is a world user. A session asks the service for feed pages
(``POST /v1/feed``) and reacts to every post shown with the world's ground-truth
probabilities (``GroundTruth.probabilities``: position bias over the session's slots,
freshness, affinity), damped by fatigue on later pages; the outcomes are sampled exactly as
the world generator samples its logs, and sent back through ``POST /v1/events``. What users
do feeds what they do next: after each page they continue with probability
``sigmoid(continue_logit + continue_per_engagement * engagements on the page)``, and after a
session they come back (later in the run) with probability
``sigmoid(return_logit + return_per_engagement * engagements in the session)``, so a better
feed shows up in pages per session and sessions per user, not only in rates.

Every impression's true expected outcomes (the probabilities the simulator sampled from) go
to ``truth.parquet``: what the world says a variant's exposures are worth, to check the
online result against (``ExperimentReport``).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedrec.events.event_client import send_events
from feedrec.events.feed_recorder import world_ts
from feedrec.world.generator import truth_for_day
from feedrec.world.layout import WorldLayout
from feedrec.world.truth import BINARY_TASKS, DWELL_SIGMA, MEDIA_VIDEO, GroundTruth

TRUTH_FILE = "truth.parquet"
SIMULATION_FILE = "simulation.json"
TRUTH_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string()),
        pa.field("position", pa.int64()),
        pa.field("session_position", pa.int64()),
        pa.field("user_id", pa.int64()),
        pa.field("post_id", pa.int64()),
        pa.field("variant", pa.string()),
        pa.field("session_id", pa.string()),
        pa.field("page", pa.int64()),
        pa.field("ts", pa.float64()),
        pa.field("e_view", pa.float64()),
        *[pa.field(f"e_{task}", pa.float64()) for task in BINARY_TASKS],
        pa.field("e_dwell", pa.float64()),
    ]
)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def expected_outcomes(
    truth: GroundTruth,
    users: np.ndarray,
    posts: np.ndarray,
    ts: np.ndarray | float,
    slots: np.ndarray,
    pages: np.ndarray | int,
    fatigue: float,
) -> dict[str, np.ndarray]:
    """What a simulated user is expected to do with ``posts`` [N] shown at session ``slots``
    [N] on ``pages`` (0-based) at world time ``ts``: ``view``, the binary tasks and ``dwell``,
    float [N]. One post's outcome depends on that post and its slot only, not on its
    neighbours (the world's position bias has no cascade)."""
    prob = truth.probabilities(users, posts, ts, slots)
    damp = fatigue ** np.asarray(pages)  # fewer posts get looked at as the session drags on
    return {k: v * damp for k, v in prob.items()}


@dataclass(frozen=True)
class SimulationConfig:
    """How long, how fast and how the simulated users behave.

    duration_s, rate_rps: run time and the feed requests per second aimed at (all clients
    together); clients: concurrent sessions; users: panel size (world users drawn at random;
    0 = all); page_size: posts per feed request; max_pages: pages a session may ask for;
    fatigue: p(view) multiplier per page already seen in the session; continue_* / return_*:
    the logits above; min_return_s: a user's next session starts at least this long after the
    last one ended (so sessions can be told apart by the gap); seed: the users' randomness.
    """

    duration_s: float = 60.0
    rate_rps: float = 8.0
    clients: int = 4
    users: int = 0
    page_size: int = 10
    max_pages: int = 3
    fatigue: float = 0.8
    continue_logit: float = -1.0
    continue_per_engagement: float = 1.0
    return_logit: float = 0.5
    return_per_engagement: float = 0.5
    min_return_s: float = 3.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "duration_s": self.duration_s > 0,
            "rate_rps": self.rate_rps > 0,
            "clients": self.clients >= 1,
            "users": self.users >= 0,
            "page_size": 1 <= self.page_size <= 100,
            "max_pages": self.max_pages >= 1,
            "fatigue": 0 < self.fatigue <= 1,
            "min_return_s": self.min_return_s >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"simulation config: bad {name}: {getattr(self, name)!r}")


@dataclass
class SimulationResult:
    """Counts of a run (the per-impression truth is in ``<out>/truth.parquet``)."""

    feeds: int = 0
    sessions: int = 0
    impressions: int = 0
    events: int = 0
    failed_feeds: int = 0
    users: int = 0
    seconds: float = 0.0
    truth_path: Path | None = None
    variants: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        arms = ", ".join(f"{k} {v}" for k, v in sorted(self.variants.items()))
        return (
            f"simulated {self.users} users for {self.seconds:.0f} s: {self.sessions} sessions, "
            f"{self.feeds} feeds ({self.failed_feeds} failed), {self.impressions} impressions, "
            f"{self.events} events sent; feeds per variant: {arms}"
        )


class UserSimulator:
    """Drives a live feed service at ``url`` with users of the world at ``world_dir``, whose
    serving day is ``serving_day`` (the day the service's features are for)."""

    def __init__(self, url: str, world_dir: Path, serving_day: int, cfg: SimulationConfig) -> None:
        self.url = url.rstrip("/")
        self.cfg = cfg
        self.serving_day = serving_day
        self.truth: GroundTruth = truth_for_day(WorldLayout(Path(world_dir)), serving_day)
        n_users = len(self.truth.theta)
        rng = np.random.default_rng(cfg.seed)
        size = n_users if cfg.users == 0 else min(cfg.users, n_users)
        self.panel = rng.choice(n_users, size=size, replace=False)
        self._lock = threading.Lock()
        self._rng = rng
        self._available: list[tuple[float, int]] = [(0.0, int(u)) for u in self.panel]
        self._rows: list[dict[str, Any]] = []
        self.result = SimulationResult(users=size)

    # -- scheduling --------------------------------------------------------------------------

    def _next_user(self, now: float) -> int | None:
        """A user free to start a session now (random among them), or None."""
        with self._lock:
            free = [i for i, (t, _) in enumerate(self._available) if t <= now]
            if not free:
                return None
            i = free[int(self._rng.integers(len(free)))]
            return self._available.pop(i)[1]

    def _returns(self, user: int, engaged: int, now: float) -> None:
        with self._lock:
            self.result.sessions += 1
            p = _sigmoid(self.cfg.return_logit + self.cfg.return_per_engagement * engaged)
            if self._rng.random() < p:
                self._available.append((now + self.cfg.min_return_s, user))

    # -- one user's behaviour ----------------------------------------------------------------

    def react(
        self,
        user: int,
        posts: np.ndarray,
        first_slot: int,
        page: int,
        ts: float,
        rng: np.random.Generator,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Outcomes of ``posts`` shown at session slots ``first_slot ..`` on page ``page``
        (0-based), and their true expectations. Returns (outcomes, expected): ``view``,
        ``like``.. as bool arrays [N] and ``dwell`` float seconds; ``expected``: ``view``,
        tasks, ``dwell``, float [N]."""
        users = np.full(len(posts), user)
        slots = first_slot + np.arange(len(posts))
        expected = expected_outcomes(self.truth, users, posts, ts, slots, page, self.cfg.fatigue)
        view = rng.random(len(posts)) < expected["view"]
        outcomes: dict[str, np.ndarray] = {"view": view}
        for task in BINARY_TASKS:  # p(task | view) = p(task) / p(view), as the generator does
            outcomes[task] = view & (rng.random(len(posts)) * expected["view"] < expected[task])
        is_video = (self.truth.media[posts] == MEDIA_VIDEO).astype(np.float64)
        mu = GroundTruth.dwell_mu(self.truth.affinity(users, posts), is_video)
        outcomes["dwell"] = np.where(view, rng.lognormal(mu, DWELL_SIGMA), 0.0)
        return outcomes, expected

    def _events(
        self, feed: dict[str, Any], outcomes: dict[str, np.ndarray]
    ) -> list[dict[str, Any]]:
        events = []
        for position, item in enumerate(feed["items"]):
            kinds: list[tuple[str, float | None]] = [("impression", None)]
            if outcomes["view"][position]:
                kinds.append(("view", None))
                kinds += [(t, None) for t in BINARY_TASKS if outcomes[t][position]]
                kinds.append(("dwell", round(float(outcomes["dwell"][position]), 3)))
            for kind, dwell in kinds:
                event: dict[str, Any] = {
                    "type": kind,
                    "request_id": feed["request_id"],
                    "position": position,
                    "post_id": item["post_id"],
                    "user_id": feed["user_id"],
                    "variant": feed["variant"],
                    "idempotency_key": f"{feed['request_id']}.{position}.{kind}",
                }
                if dwell is not None:
                    event["dwell_s"] = dwell
                events.append(event)
        return events

    def session(self, client: httpx.Client, user: int, rng: np.random.Generator) -> int:
        """One session of ``user``; returns the feed requests it made."""
        session_id = uuid.uuid4().hex
        engaged_total = 0
        requests = 0
        for page in range(self.cfg.max_pages):
            requests += 1
            try:
                r = client.post(
                    f"{self.url}/v1/feed", json={"user_id": user, "count": self.cfg.page_size}
                )
            except httpx.TransportError:
                r = None
            if r is None or r.status_code != 200:
                with self._lock:
                    self.result.failed_feeds += 1
                break
            feed = r.json()
            posts = np.asarray([i["post_id"] for i in feed["items"]], np.int64)
            if not len(posts):
                break
            ts = world_ts(self.serving_day, time.time())
            first_slot = page * self.cfg.page_size
            outcomes, expected = self.react(user, posts, first_slot, page, ts, rng)
            events = self._events(feed, outcomes)
            send_events(client, self.url, events)
            engaged = int(sum(outcomes[t].sum() for t in ("like", "comment", "share")))
            engaged_total += engaged
            rows = [
                {
                    "request_id": feed["request_id"],
                    "position": k,
                    "session_position": first_slot + k,
                    "user_id": user,
                    "post_id": int(posts[k]),
                    "variant": feed["variant"],
                    "session_id": session_id,
                    "page": page,
                    "ts": ts,
                    "e_view": float(expected["view"][k]),
                    **{f"e_{t}": float(expected[t][k]) for t in BINARY_TASKS},
                    "e_dwell": float(expected["dwell"][k]),
                }
                for k in range(len(posts))
            ]
            with self._lock:
                self._rows += rows
                self.result.feeds += 1
                self.result.impressions += len(posts)
                self.result.events += len(events)
                arm = feed["variant"]
                self.result.variants[arm] = self.result.variants.get(arm, 0) + 1
            p_more = _sigmoid(self.cfg.continue_logit + self.cfg.continue_per_engagement * engaged)
            if rng.random() >= p_more:
                break
        self._returns(user, engaged_total, time.monotonic())
        return requests

    # -- the run -----------------------------------------------------------------------------

    def run(
        self, out_dir: Path, progress: Callable[[SimulationResult], None] | None = None
    ) -> SimulationResult:
        """Simulate for ``duration_s``; writes ``out_dir/truth.parquet``."""
        started = time.monotonic()
        end = started + self.cfg.duration_s
        interval = self.cfg.clients / self.cfg.rate_rps  # per client, between feed requests

        def client_loop(index: int) -> None:
            rng = np.random.default_rng([self.cfg.seed, index])
            with httpx.Client(timeout=30) as client:
                next_start = time.monotonic()
                while time.monotonic() < end:
                    user = self._next_user(time.monotonic())
                    if user is None:
                        time.sleep(0.05)
                        continue
                    # Each feed request counts against the rate: a 3-page session waits 3 times.
                    next_start += interval * self.session(client, user, rng)
                    time.sleep(max(0.0, next_start - time.monotonic()))
                    if progress is not None and index == 0:
                        progress(self.result)

        with ThreadPoolExecutor(self.cfg.clients) as pool:
            for f in [pool.submit(client_loop, i) for i in range(self.cfg.clients)]:
                f.result()
        self.result.seconds = time.monotonic() - started
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / TRUTH_FILE
        pq.write_table(pa.Table.from_pylist(self._rows, schema=TRUTH_SCHEMA), path)
        # How the users behaved: what recomputing the truth for another ranking needs.
        behaviour = {"serving_day": self.serving_day, **asdict(self.cfg)}
        (out_dir / SIMULATION_FILE).write_text(json.dumps(behaviour, indent=2) + "\n")
        self.result.truth_path = path
        return self.result
