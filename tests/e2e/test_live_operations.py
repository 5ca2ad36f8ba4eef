"""Serving follows the model registry: promotion, rollback, a corrupt version and a shadow
ranker, under traffic, and a killed Triton server that the stack restarts.

Every request sent during these changes must be a 200; ``fallback: true`` (the flagged
popularity feed) is allowed only while Triton is down.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from feedrec.artifacts.model_registry import PRODUCTION, ModelRegistry, RegistryEntry
from feedrec.events.event_log import EventLog
from feedrec.events.event_sink import EventSink
from feedrec.events.feed_event import SERVED, SHADOW
from feedrec.runtime import RunLayout
from feedrec.serving.ranker_client import CHANNEL_ARGS, TritonRankerClient
from feedrec.serving.stack import ServingStack, StackConfig

METRICS = {"auc.like": 0.7, "logloss.like": 0.2}
POLL_S = 0.5
#: How long after the first replica the other replicas may still answer with the old version.
SWITCH_S = 6 * POLL_S
#: The longest an Ingress replica's gRPC channel waits before reconnecting to a restarted Triton.
MAX_RECONNECT_BACKOFF_S = dict(CHANNEL_ARGS)["grpc.max_reconnect_backoff_ms"] / 1000
#: Admin calls are not what these tests time (traffic is): on a loaded 2-core host one can take
#: longer than httpx's 5 s default while both training and a stack share the cores.
ADMIN_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def registry(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    run = RunLayout(trained_run)
    reg = ModelRegistry(tmp_path_factory.mktemp("registry"))
    for name, src in (("ranker", run.ranker), ("retrieval", run.retrieval)):
        reg.register(name, src, metrics=METRICS)
        reg.promote(name, 1)
    return reg


@pytest.fixture(scope="module")
def admin_token(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    token = "s3cret-" + "x" * 40
    path = tmp_path_factory.mktemp("secrets") / "admin_token"
    path.write_text(token)
    path.chmod(0o600)
    return path, token


@pytest.fixture(scope="module")
def registry_stack(
    trained_run: Path, registry: ModelRegistry, http_port: int, admin_token: tuple[Path, str]
) -> Iterator[ServingStack]:
    config = StackConfig(
        run_dir=trained_run,
        http_port=http_port,
        registry=registry.root,
        registry_poll_s=POLL_S,
        service_overrides={"admin_token_file": str(admin_token[0])},
    )
    with ServingStack(config) as s:
        yield s


def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        time.sleep(0.2)


class Traffic:
    """Two threads sending feed requests until stopped; every answer is recorded."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[dict] = []
        self._stop = threading.Event()
        self.clients = 2
        self._pool = concurrent.futures.ThreadPoolExecutor(self.clients)
        self._running = [self._pool.submit(self._send, i) for i in range(self.clients)]

    def _send(self, offset: int) -> None:
        with httpx.Client(timeout=30) as client:
            i = offset
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(
                        f"{self.url}/v1/feed", json={"user_id": i % 50, "count": 5, "debug": True}
                    )
                    status, body = r.status_code, (r.json() if r.status_code == 200 else {})
                    error = "" if status == 200 else r.text[:200]
                except httpx.TransportError as e:
                    # No answer at all (a connection closed under a request, e.g. by an
                    # ingress that cannot replay it): a failure like any non-200.
                    status, body, error = 0, {}, repr(e)
                self.answers.append(
                    {
                        "sent": sent,
                        "t": time.monotonic(),
                        "status": status,
                        "error": error,
                        "fallback": body.get("fallback"),
                        "ranker": body.get("model_version"),
                        "retrieval": (body.get("debug") or {}).get("retrieval_version"),
                    }
                )
                i += 2

    def wait_for(self, what: Callable[[dict], bool], timeout_s: float, then: int = 5) -> float:
        """Seconds until an answer satisfies ``what``; waits for ``then`` more answers."""
        start, seen = time.monotonic(), None
        while time.monotonic() - start < timeout_s:
            for a in self.answers[-50:]:
                if a["t"] >= start and what(a):
                    seen = a["t"] - start
                    break
            if seen is not None:
                n = len(self.answers)
                while len(self.answers) < n + then and time.monotonic() - start < timeout_s:
                    time.sleep(0.05)
                return seen
            time.sleep(0.05)
        raise AssertionError(f"not seen within {timeout_s} s; last answers: {self.answers[-5:]}")

    def stop(self) -> list[dict]:
        self._stop.set()
        for f in self._running:
            f.result()
        self._pool.shutdown()
        return self.answers


def test_admin_endpoints_need_the_token(
    registry_stack: ServingStack, admin_token: tuple[Path, str]
) -> None:
    url = f"{registry_stack.url}/admin/models"
    assert httpx.get(url, timeout=ADMIN_TIMEOUT_S).status_code == 401
    wrong = httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=ADMIN_TIMEOUT_S)
    assert wrong.status_code == 403
    listed = httpx.get(
        url, headers={"Authorization": f"Bearer {admin_token[1]}"}, timeout=ADMIN_TIMEOUT_S
    )
    assert listed.status_code == 200
    assert {(m["name"], m["version"], m["production"]) for m in listed.json()} >= {
        ("ranker", 1, True),
        ("retrieval", 1, True),
    }
    assert "/admin/models" not in httpx.get(f"{registry_stack.url}/openapi.json").text


def test_promotion_and_rollback_under_traffic_fail_no_request(
    registry_stack: ServingStack,
    registry: ModelRegistry,
    trained_run: Path,
    admin_token: tuple[Path, str],
) -> None:
    run = RunLayout(trained_run)
    auth = {"Authorization": f"Bearer {admin_token[1]}"}
    traffic = Traffic(registry_stack.url)
    try:
        traffic.wait_for(lambda a: a["ranker"] == "ranker-v1", 30)
        for name, src in (("ranker", run.ranker), ("retrieval", run.retrieval)):
            entry = registry.register(name, src, metrics=METRICS)
            promoted = httpx.post(
                f"{registry_stack.url}/admin/models/{name}/promote",
                json={"version": entry.version},
                headers=auth,
                timeout=ADMIN_TIMEOUT_S,
            )
            assert promoted.status_code == 200, promoted.text
        swap_s = traffic.wait_for(
            lambda a: a["ranker"] == "ranker-v2" and a["retrieval"] == "retrieval-v2", 300
        )
        rollback_at = time.monotonic()
        back = httpx.post(
            f"{registry_stack.url}/admin/models/ranker/rollback",
            headers=auth,
            timeout=ADMIN_TIMEOUT_S,
        )
        assert back.status_code == 200 and back.json()["version"] == 1, back.text
        rollback_s = traffic.wait_for(lambda a: a["ranker"] == "ranker-v1", 60)
    finally:
        answers = traffic.stop()
    failed = [a for a in answers if a["status"] != 200 or a["fallback"]]
    # Each Ingress replica switches atomically at its next registry poll once Triton has v2:
    # a request sent a few polls after the first v2 answer never gets v1 until the rollback.
    first_v2 = min(a["t"] for a in answers if a["ranker"] == "ranker-v2")
    old = [a["sent"] - first_v2 for a in answers if a["ranker"] == "ranker-v1"]
    lag = max((s for s in old if s < rollback_at - first_v2), default=0.0)
    print(
        f"\nregistry swap: {len(answers)} requests, {len(failed)} failed or fallback; "
        f"promotion visible after {swap_s:.1f} s, on every replica {max(lag, 0):.1f} s later; "
        f"rollback after {rollback_s:.1f} s"
    )
    assert len(answers) > 20
    assert not failed, failed[:5]
    stale = [
        a
        for a in answers
        if first_v2 + SWITCH_S < a["sent"] < rollback_at and a["ranker"] == "ranker-v1"
    ]
    assert not stale, stale[:3]


def test_corrupt_production_version_is_refused_and_the_old_one_keeps_serving(
    registry_stack: ServingStack, registry: ModelRegistry, trained_run: Path
) -> None:
    watcher = registry_stack.ranker_watcher
    assert watcher is not None
    before = registry.production_version("ranker")
    _until(lambda: watcher.version == before, 180)  # Triton serves production (after rollback)
    bad = registry.register("ranker", RunLayout(trained_run).ranker, metrics=METRICS)
    weights = bad.path / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated on disk after registration
    # `promote` would refuse it (it verifies checksums): point production at it directly, as a
    # second writer or a restored backup might.
    pointer = registry.root / "ranker" / PRODUCTION
    history = json.loads(pointer.read_text())["history"]
    pointer.write_text(json.dumps({"version": bad.version, "history": [*history, bad.version]}))
    traffic = Traffic(registry_stack.url)
    try:
        _until(lambda: bad.version in watcher.refused, 60)
        n = len(traffic.answers)
        traffic.wait_for(lambda a: True, 30, then=10)
    finally:
        answers = traffic.stop()
    assert "checksum mismatch for weights.pt" in watcher.refused[bad.version]
    recent = answers[n:]
    assert recent and all(a["status"] == 200 and not a["fallback"] for a in recent), recent[:5]
    assert {a["ranker"] for a in recent} == {f"ranker-v{before}"}
    registry.rollback("ranker")  # production back on a good version for the next tests


def _shadow_records(run: RunLayout, start: int, label: str) -> list[dict]:
    return [
        r.payload
        for r in EventLog(run.events).records(start)
        if r.payload["kind"] == SHADOW and r.payload["shadow_model_version"] == label
    ]


@dataclass
class ShadowRun:
    """What traffic saw while a shadow version was set, then cleared: every answer, the
    shadow records (``shadows``), the served records by request id, seconds from setting it
    to its first record, and the shadow records written after the clear was read."""

    answers: list[dict]
    shadows: list[dict]
    served: dict[str, dict]
    first_s: float
    after_clear: list[dict]


def _shadow_run(
    stack: ServingStack, run: RunLayout, name: str, candidate: RegistryEntry, token: str
) -> ShadowRun:
    """Set ``candidate`` as the shadow ``name`` over the admin API under traffic, wait for 20
    shadow feeds, clear it, and send 20 more requests."""
    auth = {"Authorization": f"Bearer {token}"}
    url = f"{stack.url}/admin/models/{name}/shadow"
    start = EventLog(run.events).end_seq()
    traffic = Traffic(stack.url)
    try:
        set_at = time.monotonic()
        done = httpx.post(
            url, json={"version": candidate.version}, headers=auth, timeout=ADMIN_TIMEOUT_S
        )
        assert done.status_code == 200, done.text
        assert done.json()["name"] == name and done.json()["version"] == candidate.version
        _until(lambda: len(_shadow_records(run, start, candidate.label)) >= 20, 120)
        first_s = time.monotonic() - set_at
        cleared = httpx.post(url, json={"version": None}, headers=auth, timeout=ADMIN_TIMEOUT_S)
        assert cleared.status_code == 200 and cleared.json()["previous"] == candidate.version
        time.sleep(4 * POLL_S)  # every replica has read the cleared pointer
        after_clear = EventLog(run.events).end_seq()
        traffic.wait_for(lambda a: True, 30, then=20)
    finally:
        answers = traffic.stop()
    shadows = _shadow_records(run, start, candidate.label)
    served = {
        r.payload["request_id"]: r.payload
        for r in EventLog(run.events).records(start)
        if r.payload["kind"] == SERVED
    }
    print(
        f"\nshadow {name}: first shadow records {first_s:.1f} s after setting it; "
        f"{len(shadows)} shadow feeds for {len(served)} served; shadow latency p50 "
        f"{sorted(s['latency_ms'] for s in shadows)[len(shadows) // 2]:.1f} ms"
    )
    return ShadowRun(
        answers, shadows, served, first_s, _shadow_records(run, after_clear, candidate.label)
    )


def _assert_shadow_equals_served(shadow_run: ShadowRun, served_version: str) -> None:
    """Same model files in shadow: every shadow feed is its served feed, post for post."""
    assert shadow_run.shadows and not shadow_run.after_clear  # cleared: no more shadow traffic
    for shadow in shadow_run.shadows:
        feed = shadow_run.served[shadow["request_id"]]
        assert shadow["served_model_version"] == served_version
        assert [i["post_id"] for i in shadow["items"]] == [i["post_id"] for i in feed["items"]]
        assert [i["served_position"] for i in shadow["items"]] == list(range(len(feed["items"])))
        for mine, theirs in zip(shadow["items"], feed["items"], strict=True):
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)


def test_shadow_ranker_scores_served_requests_and_changes_none(
    registry_stack: ServingStack,
    registry: ModelRegistry,
    trained_run: Path,
    admin_token: tuple[Path, str],
    tmp_path: Path,
) -> None:
    """A shadow version (the production weights registered again) is loaded into Triton next
    to production; every personalised feed is then also ranked by it off the request path and
    logged as a shadow record, never returned. With the same weights, the same candidates and
    the same rules, the shadow feed must equal the served feed post for post."""
    run = RunLayout(trained_run)
    production = f"ranker-v{registry.production_version('ranker')}"
    candidate = registry.register("ranker", run.ranker, metrics=METRICS)
    shadow_run = _shadow_run(registry_stack, run, "ranker", candidate, admin_token[1])
    answers = shadow_run.answers
    assert all(a["status"] == 200 and not a["fallback"] for a in answers), answers[:5]
    assert {a["ranker"] for a in answers} == {production}  # the shadow is never served
    _assert_shadow_equals_served(shadow_run, production)
    for shadow in shadow_run.shadows:
        assert shadow_run.served[shadow["request_id"]]["model_version"] == production
    triton = registry_stack.triton
    assert triton is not None  # ... and the cleared version has left Triton
    assert not (run.serve / "triton_repository" / "ranker" / str(candidate.version)).exists()
    assert not TritonRankerClient(triton.grpc_url).ready_sync(str(candidate.version))
    # The sink turns them into Parquet rows beside the exposures (a scratch world here).
    report = EventSink(EventLog(run.events), tmp_path / "world").run()
    assert report.shadow_rows >= sum(len(s["items"]) for s in shadow_run.shadows)
    assert list((tmp_path / "world" / "live" / "shadow").rglob("*.parquet"))


def test_shadow_retrieval_feeds_served_requests_and_changes_none(
    registry_stack: ServingStack,
    registry: ModelRegistry,
    trained_run: Path,
    admin_token: tuple[Path, str],
) -> None:
    """A shadow retrieval version (the production two-tower and index registered again) is
    loaded by the Retrieval replicas; every personalised feed is then also built from its
    candidates (ranked by the served ranker, same rules) off the request path and logged as a
    shadow record, never returned. With the same towers and index, the shadow feed must equal
    the served feed post for post; responses keep the production retrieval."""
    run = RunLayout(trained_run)
    production = f"retrieval-v{registry.production_version('retrieval')}"
    candidate = registry.register("retrieval", run.retrieval, metrics={"recall@100": 0.1})
    shadow_run = _shadow_run(registry_stack, run, "retrieval", candidate, admin_token[1])
    answers = shadow_run.answers
    assert all(a["status"] == 200 and not a["fallback"] for a in answers), answers[:5]
    assert {a["retrieval"] for a in answers} == {production}  # the shadow is never served
    _assert_shadow_equals_served(shadow_run, production)


def test_killed_triton_is_restarted_and_full_quality_returns(
    registry_stack: ServingStack,
) -> None:
    triton = registry_stack.triton
    assert triton is not None and triton.pid is not None
    traffic = Traffic(registry_stack.url)
    try:
        traffic.wait_for(lambda a: a["fallback"] is False, 30)
        killed_at = time.monotonic()
        os.killpg(triton.pid, signal.SIGKILL)  # the server and its backend stubs
        traffic.wait_for(lambda a: a["fallback"] is True, 30, then=1)
        traffic.wait_for(lambda a: a["fallback"] is False, 180, then=10)
        # Each Ingress replica's channel reconnects at its own next backoff step: until then
        # that replica still fails fast, so full quality may come back replica by replica.
        _until(lambda: not any(a["fallback"] for a in traffic.answers[-20:]), 60)
    finally:
        answers = traffic.stop()
    during = [a for a in answers if a["t"] >= killed_at]
    first_fallback = next(a for a in during if a["fallback"])
    # Sent after the first fallback: an answer to a request sent before the kill is no sign.
    recovered = next(a for a in during if a["sent"] > first_fallback["t"] and not a["fallback"])
    relapse_s = max(a["t"] for a in during if a["fallback"]) - recovered["t"]
    print(
        f"\ntriton kill: {len(during)} requests after the kill, "
        f"{sum(bool(a['fallback']) for a in during)} flagged fallback, "
        f"{sum(a['status'] != 200 for a in during)} non-200; full quality again "
        f"{recovered['t'] - killed_at:.1f} s after the kill, on every replica "
        f"{max(relapse_s, 0.0):.1f} s later; restarts {registry_stack.triton_restarts}"
    )
    assert registry_stack.triton_restarts == 1
    assert all(a["status"] == 200 for a in during)
    assert relapse_s <= MAX_RECONNECT_BACKOFF_S + 1.0
    assert during[-1]["fallback"] is False


#: The fault tests' measurement window: steady traffic, the kill ``KILL_AT_S`` into it.
WINDOW_S, KILL_AT_S = 60.0, 20.0
#: How soon after an Ingress replica's death a request may still fail: the controller sees the
#: death and HAProxy reloads its backends within this.
RELOAD_GRACE_S = 1.0


@pytest.mark.parametrize("deployment", ["Retrieval", "Ingress"])
def test_killed_serve_replica_is_replaced(
    registry_stack: ServingStack, deployment: str, replica_pids: Callable[[str], list[int]]
) -> None:
    """SIGKILL one replica process 20 s into a 60 s window of steady traffic; Serve replaces it.

    Retrieval: the Ingress catches the failure, so requests get the flagged fallback until a
    Retrieval replica answers again, never an error, and full quality is back within 15 s.
    Ingress (two replicas): HAProxy replays on the other replica a request whose connection
    closed without an answer (``SERVE_ENV``'s ``empty-response``), whether it was inside the
    killed replica or sent down a kept-alive connection to it; a request the replica had begun
    to answer cannot be replayed, so at most one per client, sent before the kill or within
    ``RELOAD_GRACE_S`` of it, may fail."""
    traffic = Traffic(registry_stack.url)
    try:
        traffic.wait_for(lambda a: a["fallback"] is False, 30, then=20)
        before = replica_pids(deployment)
        pid = before[0]
        window_start = time.monotonic()
        time.sleep(KILL_AT_S)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        replaced_s = None
        while time.monotonic() < window_start + WINDOW_S:
            time.sleep(0.2)
            if replaced_s is None:
                live = replica_pids(deployment)
                if pid not in live and len(live) >= len(before):
                    replaced_s = time.monotonic() - killed_at
    finally:
        answers = traffic.stop()
    window = [a for a in answers if window_start <= a["sent"] < window_start + WINDOW_S]
    failed = [a for a in window if a["status"] != 200]
    degraded = [a for a in window if a["t"] >= killed_at and (a["status"] != 200 or a["fallback"])]
    recovered_s = max((a["t"] for a in degraded), default=killed_at) - killed_at
    print(
        f"\nkill {deployment} replica ({len(before)} live): {len(window)} requests in the "
        f"{WINDOW_S:.0f} s window, {len(failed)} non-200 ({len(failed) / len(window):.2%}), "
        f"{len(degraded) - len(failed)} fallback; last degraded answer {recovered_s:.1f} s "
        f"after the kill; replacement replica live after {replaced_s} s"
    )
    assert replaced_s is not None, "the killed replica was not replaced"
    if deployment == "Ingress":
        # Only requests in flight when the replica died, at most one per client, or sent just
        # after it: seen once in CI (both clients, 0.13 s after the kill, no answer at all; not
        # reproduced in 3 reruns), probably caught while HAProxy reloaded without the replica.
        early = [a for a in failed if a["sent"] < killed_at + RELOAD_GRACE_S]
        assert early == failed, [{**a, "after_kill_s": a["sent"] - killed_at} for a in failed]
        assert len(failed) <= traffic.clients, failed
    else:
        # Retrieval failures are caught by the Ingress: the flagged fallback, never an error.
        assert not failed, failed
        assert recovered_s < 15
    assert all(a["status"] == 200 and not a["fallback"] for a in window[-10:])
