"""The served debug run: one Triton + Ray Serve stack per e2e module."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from feedrec.serving.stack import ServingStack, StackConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def http_port() -> int:
    """The Serve ingress port of this session. One for every module: Serve's HTTP proxy
    outlives an application (stacks delete their app, not Serve, on a cluster they did not
    start), and a later ``serve.start`` with another port would not move it."""
    return free_port()


@pytest.fixture(scope="module")
def stack(trained_run: Path, http_port: int) -> Iterator[ServingStack]:
    with ServingStack(StackConfig(run_dir=trained_run, http_port=http_port)) as s:
        yield s


def _replica_pids(deployment: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray.get_runtime_context().gcs_address,  # this session's cluster, not another
        filters=[("class_name", "=", f"ServeReplica:feed:{deployment}"), ("state", "=", "ALIVE")],
    )
    return sorted(int(a.pid) for a in actors)


@pytest.fixture
def replica_pids() -> Callable[[str], list[int]]:
    """``replica_pids(deployment)`` -> the pids of that deployment's live replicas (none while
    a killed one's replacement starts)."""
    return _replica_pids
