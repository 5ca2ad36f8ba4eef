"""Shared fixtures: one local Ray cluster and one tiny pipeline run per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


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
    pipeline.train(run, "ranker", "debug")
    pipeline.train(run, "two_tower", "debug")
    pipeline.index(run)
    return debug_run
