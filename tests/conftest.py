"""Shared fixtures: one local Ray cluster and one tiny pipeline run per test session."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# `make test` runs pytest under xdist with one worker (`-n 1`) so that a hard crash of the worker
# process is survivable. Ray 2.60's driver can abort in its GCS pubsub client ("Check failed:
# !reply.publisher_id().empty()" in subscriber.cc) while the GCS tears down many actors at once,
# e.g. at the end of a Ray Train run; that kills the pytest process (the Ray driver) with no
# report. A test whose worker crashed is rescheduled once on a fresh worker (fresh Ray cluster,
# fresh session fixtures); a second crash, and every ordinary failure, fails the run.
_CRASH_RETRIES = 1
_crashes: dict[str, int] = {}


@pytest.hookimpl(optionalhook=True)  # an xdist hook: `-p no:xdist` runs still collect
def pytest_handlecrashitem(crashitem: str, report: pytest.TestReport, sched: object) -> None:
    """xdist hook: reschedule a crashed test once (see the comment above)."""
    _crashes[crashitem] = _crashes.get(crashitem, 0) + 1
    if _crashes[crashitem] <= _CRASH_RETRIES:
        sched.mark_test_pending(crashitem)  # type: ignore[attr-defined]
        report.outcome = "rerun"  # type: ignore[assignment]


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    """Show a rescheduled crash as ``R`` / ``RERUN`` (not as a failure)."""
    if report.outcome == "rerun":
        return "rerun", "R", "RERUN"
    return None


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray on 127.0.0.1 for the whole session (integration and e2e tests)."""
    import ray
    import ray.data

    from feedrec.runtime import init_ray

    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster: None) -> Path:
    """A generated + preprocessed ``debug`` world (shared, treat as read-only)."""
    from feedrec import pipeline
    from feedrec.runtime import RunLayout

    reuse = os.environ.get("FEEDREC_TEST_RUN")  # developer loop: a run made by this fixture
    if reuse:  # and `trained_run` before, e.g. `feedrec generate --preset debug` + train + index
        return Path(reuse).resolve()
    run = RunLayout(tmp_path_factory.mktemp("run"))
    pipeline.generate(run, "debug")
    pipeline.preprocess(run)
    return run.root


@pytest.fixture(scope="session")
def trained_run(debug_run: Path) -> Path:
    """``debug_run`` plus both trained models and the retrieval index."""
    from feedrec import pipeline
    from feedrec.runtime import RunLayout

    run = RunLayout(debug_run)
    if os.environ.get("FEEDREC_TEST_RUN") and run.retrieval.is_dir():
        return debug_run
    pipeline.train(run, "ranker", "debug")
    pipeline.train(run, "two_tower", "debug")
    pipeline.index(run)
    return debug_run


class BusRecords:
    """Event-bus records for tests: a served feed, and a client event about one of its slots."""

    @staticmethod
    def served(
        rid: str, user: int, posts: list[int], at: float, variant: str = "control"
    ) -> dict[str, Any]:
        """A feed served at bus time ``at`` (world time day 30.25), one slot per post."""
        from feedrec.events.feed_event import served_record

        return served_record(
            request_id=rid,
            user_id=user,
            ts=30.25,
            received_at=at,
            variant=variant,
            model_version="3",
            snapshot="day30-abc",
            fallback=False,
            cold_start=False,
            latency_ms=42.0,
            items=[
                {
                    "post_id": p,
                    "position": i,
                    "score": 1.0 / (i + 1),
                    "scores": {"like": 0.1, "comment": 0.01, "share": 0.02, "hide": 0.03},
                    "propensity": 1.0,
                }
                for i, p in enumerate(posts)
            ],
        )

    @staticmethod
    def event(
        rid: str,
        kind: str,
        position: int,
        post: int,
        user: int,
        at: float,
        key: str,
        variant: str = "control",
        dwell_s: float | None = None,
    ) -> dict[str, Any]:
        """A validated client event received at bus time ``at`` (key: ``key-<key>``)."""
        from feedrec.events.feed_event import event_record, feed_event

        extra = {} if dwell_s is None else {"dwell_s": dwell_s}
        event = feed_event(
            type=kind,
            request_id=rid,
            position=position,
            post_id=post,
            user_id=user,
            variant=variant,
            idempotency_key=f"key-{key}",
            **extra,
        )
        return event_record(event, at)


@pytest.fixture
def bus_records() -> BusRecords:
    return BusRecords()


REDIS_SERVER = shutil.which("redis-server")
INSTALL = "redis-server is not installed: apt-get install -y redis-server (CI's .ci/run does)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` of a test: AOF on, fsync before every reply, no RDB snapshots,
    data under ``root``. Started, SIGKILLed and restarted (same dir, same port) by PID."""

    def __init__(self, root: Path) -> None:
        assert REDIS_SERVER is not None
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, stream: str = "events") -> str:
        return f"redis://127.0.0.1:{self.port}/0?stream={stream}"

    def start(self) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [
                str(REDIS_SERVER),
                *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root)),
                *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
                *("--logfile", str(self.root / "redis.log")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    client.close()
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.root / "redis.log").read_text()[-2000:]
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final AOF rewrite, exactly what a crash leaves."""
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip(INSTALL)
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One ``redis-server`` for a whole test module (e.g. the one a Serve stack reads)."""
    if REDIS_SERVER is None:
        pytest.skip(INSTALL)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
