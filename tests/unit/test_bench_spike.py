"""bench/spike.py's recovery clock: p99 must come back under target while the step still runs."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from feedrec.runtime.ray_cluster import repo_root

# bench/ holds entry points, not an installed package: load the module from its file.
_spec = importlib.util.spec_from_file_location("bench_spike", repo_root() / "bench" / "spike.py")
assert _spec is not None and _spec.loader is not None
spike = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = spike
_spec.loader.exec_module(spike)


def _windows(p99_by_start: dict[float, float]) -> list[dict[str, float]]:
    return [{"t": t, "p99_ms": ms} for t, ms in sorted(p99_by_start.items())]


def test_recovery_counts_only_windows_inside_the_step() -> None:
    # Step 20-80 s; scale-up at 61.3 s; p99 stays high until the load drops at 80 s.
    windows = _windows(
        {55.0: 900.0, 60.0: 800.0, 65.0: 700.0, 70.0: 300.0, 75.0: 600.0, 80.0: 50.0}
    )
    under_load, any_load = spike.recovery_after_scale_up(windows, 61.3, 80.0)
    assert under_load is None
    assert any_load == pytest.approx(85.0 - 61.3)


def test_recovery_under_the_step_is_measured_to_the_window_end() -> None:
    # Scale-up at 40 s; the window 50-55 s is the first one back under 100 ms.
    windows = _windows({40.0: 400.0, 45.0: 150.0, 50.0: 90.0, 55.0: 80.0, 80.0: 40.0})
    under_load, any_load = spike.recovery_after_scale_up(windows, 40.0, 80.0)
    assert under_load == pytest.approx(15.0)
    assert any_load == pytest.approx(15.0)


def test_no_scale_up_means_nothing_to_recover_from() -> None:
    assert spike.recovery_after_scale_up(_windows({0.0: 500.0}), None, 80.0) == (None, None)
