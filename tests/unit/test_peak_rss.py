"""peak_rss_mb: this process's own peak, not its parent's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

CHILD = "from feedrec.runtime.peak_rss import peak_rss_mb; print(peak_rss_mb())"


def test_the_peak_counts_what_this_process_touched() -> None:
    code = (
        "import numpy as np; from feedrec.runtime.peak_rss import peak_rss_mb; "
        "before = peak_rss_mb(); block = np.ones(300 * 2**20 // 8); print(before, peak_rss_mb())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = (float(x) for x in out.stdout.split())
    assert after - before >= 290, out.stdout  # 300 MiB, every page written


def test_a_child_does_not_inherit_its_parents_peak() -> None:
    """A child started while this process holds 600 MiB reports its own small peak (with
    ``ru_maxrss`` it reported the parent's 600 MiB on Linux)."""
    block = np.ones(600 * 2**20 // 8)
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    assert float(out.stdout) < 300, out.stdout
    del block
