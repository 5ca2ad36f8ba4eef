"""What the benchmarks that measure in child processes share: run one measurement in a fresh
interpreter (so that its time and peak RSS are its own) and write a results file with the
host it ran on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def in_fresh_process(module: str, *args: str) -> dict[str, Any]:
    """``python -m module *args`` in a new interpreter; its last stdout line, parsed as JSON.
    Exits naming the command and the end of its stderr if it fails."""
    cmd = [sys.executable, "-m", module, *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[1:])} failed:\n{res.stderr[-3000:]}")
    return dict(json.loads(res.stdout.strip().splitlines()[-1]))


def write_result(out: Path, result: dict[str, Any], started: float) -> None:
    """``result`` plus the host and the bench's wall time since ``started`` (perf_counter) as
    JSON at ``out``."""
    result = {
        **result,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
