"""The served debug run: one Triton + Ray Serve stack per e2e module."""

from __future__ import annotations

import socket
from collections.abc import Iterator
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
