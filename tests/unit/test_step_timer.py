"""The training loops' per-phase clock."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from feedrec.training.step_timer import PHASES, StepTimer


def _slow_items(waits: list[float]) -> Iterator[int]:
    for i, wait in enumerate(waits):
        time.sleep(wait)
        yield i


def test_data_counts_every_wait_but_the_pipeline_start_up() -> None:
    timer = StepTimer(torch.device("cpu"))
    assert list(timer.batches(_slow_items([0.3, 0.0, 0.0]))) == [0, 1, 2]
    assert timer.seconds["data"] < 0.1  # the first item's 0.3 s wait is start-up
    timer = StepTimer(torch.device("cpu"))
    assert list(timer.batches(_slow_items([0.0, 0.1, 0.1]))) == [0, 1, 2]
    assert timer.seconds["data"] >= 0.2


def test_phases_add_up_over_steps_and_report_flat_keys() -> None:
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.phase("forward"):
            time.sleep(0.02)
    assert timer.seconds["forward"] >= 0.06
    assert timer.seconds["backward"] == 0.0
    assert list(timer.metrics()) == [f"seconds_{name}" for name in PHASES]
    assert list(StepTimer(torch.device("cpu")).batches([])) == []


def test_an_unknown_phase_is_refused_by_name() -> None:
    with (
        pytest.raises(ValueError, match="unknown phase 'fwd'"),
        StepTimer(torch.device("cpu")).phase("fwd"),
    ):
        pass
