"""ModelWatcher: follows the production pointer, refuses corrupt versions for good, retries
versions that are not ready, and starts on an earlier version when production cannot load."""

from collections.abc import Callable
from pathlib import Path

import pytest

from feedrec.artifacts import load_artifact
from feedrec.artifacts.model_registry import ModelRegistry, RegistryEntry, RegistryError
from feedrec.serving.model_watcher import ModelWatcher, NotReady


@pytest.fixture
def registry(tmp_path: Path, ranker_artifact: Callable[..., Path]) -> ModelRegistry:
    reg = ModelRegistry(tmp_path / "reg")
    for seed in range(3):
        reg.register("ranker", ranker_artifact(tmp_path / f"m{seed}", seed))
    reg.promote("ranker", 1)
    return reg


def _label(entry: RegistryEntry) -> str:
    return f"{entry.label}:{load_artifact(entry.path).version}"


def test_follows_promotion_and_rollback(registry: ModelRegistry) -> None:
    watcher = ModelWatcher(registry, "ranker", _label, poll_s=60)
    assert watcher.version == 1 and watcher.current.startswith("ranker-v1:")
    assert watcher.poll_once() is False  # nothing changed
    registry.promote("ranker", 2)
    assert watcher.poll_once() is True and watcher.version == 2
    registry.rollback("ranker")
    assert watcher.poll_once() is True and watcher.current.startswith("ranker-v1:")


def test_corrupt_version_is_refused_once_and_the_old_one_kept(registry: ModelRegistry) -> None:
    watcher = ModelWatcher(registry, "ranker", _label, poll_s=60)
    registry.promote("ranker", 2)
    weights = registry.entry("ranker", 2).path / "weights.pt"
    weights.write_bytes(b"garbage")
    calls = []

    def counting(entry: RegistryEntry) -> str:
        calls.append(entry.version)
        return _label(entry)

    watcher._build = counting  # count how often v2 is tried
    assert watcher.poll_once() is False and watcher.poll_once() is False
    assert calls == [2]  # refused for good: files in the registry never change
    assert watcher.version == 1 and "checksum mismatch" in watcher.refused[2]


def test_not_ready_is_retried_until_ready(registry: ModelRegistry) -> None:
    ready = {1}

    def build(entry: RegistryEntry) -> str:
        if entry.version not in ready:
            raise NotReady("not loaded in Triton yet")
        return entry.label

    watcher = ModelWatcher(registry, "ranker", build, poll_s=60)
    registry.promote("ranker", 2)
    assert watcher.poll_once() is False and watcher.version == 1 and not watcher.refused
    ready.add(2)
    assert watcher.poll_once() is True and watcher.current == "ranker-v2"


def test_a_new_replica_starts_on_the_previous_version_when_production_is_bad(
    registry: ModelRegistry,
) -> None:
    registry.promote("ranker", 2)
    registry.promote("ranker", 3)
    (registry.entry("ranker", 3).path / "weights.pt").write_bytes(b"garbage")
    watcher = ModelWatcher(registry, "ranker", _label, poll_s=60)
    assert watcher.version == 2 and 3 in watcher.refused
    assert "started on v2" in (watcher.last_error or "")


def test_no_production_version_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no ranker version in production"):
        ModelWatcher(ModelRegistry(tmp_path / "empty"), "ranker", _label)


def test_the_thread_picks_up_a_promotion(registry: ModelRegistry) -> None:
    import time

    watcher = ModelWatcher(registry, "ranker", _label, poll_s=0.05).start()
    try:
        registry.promote("ranker", 2)
        deadline = time.monotonic() + 10
        while watcher.version != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watcher.version == 2
    finally:
        watcher.stop()


def test_a_shadow_watcher_follows_set_clear_and_waits_for_ready(registry: ModelRegistry) -> None:
    ready = {2: False}

    def build(entry: RegistryEntry) -> str:
        if not ready.get(entry.version, True):
            raise NotReady("not loaded yet")
        return _label(entry)

    watcher = ModelWatcher(registry, "ranker", build, poll_s=60, pointer="shadow")
    assert watcher.current is None and watcher.version is None  # no shadow set
    registry.set_shadow("ranker", 2)
    assert watcher.poll_once() is False and watcher.current is None  # not ready: retried
    ready[2] = True
    assert watcher.poll_once() is True and watcher.current.startswith("ranker-v2:")
    registry.set_shadow("ranker", 3)
    assert watcher.poll_once() is True and watcher.version == 3
    registry.set_shadow("ranker", None)
    assert watcher.poll_once() is True and watcher.current is None and watcher.version is None
    assert watcher.poll_once() is False
    registry.set_shadow("ranker", 2)
    started = ModelWatcher(registry, "ranker", build, poll_s=60, pointer="shadow")
    assert started.version == 2  # a new replica loads the shadow version at once
