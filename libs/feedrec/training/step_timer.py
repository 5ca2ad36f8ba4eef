"""Where a training loop's time goes, phase by phase: waiting for data, collating, forward,
backward and the optimizer step.

Both training loops (Ray Train's per-worker loop and the single-process baseline) time their
steps with it, so ``make bench-train`` can show side by side what the second worker gains and
what the collectives cost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")

#: The phases of one step, in order.
PHASES = ("data", "collate", "forward", "backward", "optimizer")


class StepTimer:
    """Wall seconds per phase, summed over the steps of an epoch.

    On CUDA the kernels run asynchronously, so each phase ends with a synchronize: a phase's
    seconds are then its kernels', not only the time to launch them. (The loops read the loss
    every step, which synchronizes anyway.)
    """

    def __init__(self, device: torch.device) -> None:
        self._sync = device.type == "cuda"
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def batches(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, timing each wait for the next one as ``data``, except the first: that
        one is the input pipeline's start-up, which the throughput clock leaves out too."""
        it = iter(items)
        try:
            first = next(it)
        except StopIteration:
            return
        yield first
        while True:
            started = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.seconds["data"] += time.perf_counter() - started
            yield item

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to phase ``name`` (one of ``PHASES``)."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
        started = time.perf_counter()
        yield
        if self._sync:
            torch.cuda.synchronize()
        self.seconds[name] += time.perf_counter() - started

    def metrics(self) -> dict[str, float]:
        """``{"seconds_data": ..., "seconds_collate": ..., ...}`` (flat, for trackers)."""
        return {f"seconds_{name}": round(value, 3) for name, value in self.seconds.items()}
