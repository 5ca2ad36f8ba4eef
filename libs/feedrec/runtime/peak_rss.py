"""This process's peak resident memory, measured the same way by training, jobs and benches."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB.

    On Linux, ``VmHWM`` of ``/proc/self/status``: it belongs to the address space, so a
    process started by fork + exec counts from its own start. ``ru_maxrss`` does not: Linux
    keeps it across the exec, so a benchmark child started by a parent holding 1.4 GB reported
    1.4 GB whatever it did. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on other systems)."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # "VmHWM:  123456 kB"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
