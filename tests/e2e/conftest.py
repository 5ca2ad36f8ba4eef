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


@pytest.fixture(scope="module")
def http_port() -> int:
    """A free loopback port for one module's Serve ingress."""
    return free_port()


@pytest.fixture(scope="module")
def stack(trained_run: Path, http_port: int) -> Iterator[ServingStack]:
    with ServingStack(StackConfig(run_dir=trained_run, http_port=http_port)) as s:
        yield s
