"""Training throughput: Ray Train + TorchRec DMP (2 workers) vs one plain TorchRec process.

    make bench-train            # = python -m bench.train --preset small --run-dir runs/bench

Both sides train the same ranker, with the same global batch and optimizers, on the same
preprocessed data; the single process is TorchRec's own DMP on one rank (fused FBGEMM kernels).
Prints both side by side and writes ``bench/results/train.json``:
``{"ray_dmp_samples_per_s", "single_samples_per_s", "ratio", "peak_rss_mb", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def _prepare(run_dir: Path, preset: str) -> None:
    from feedrec import pipeline
    from feedrec.data import PreprocessLayout
    from feedrec.runtime import RunLayout

    run = RunLayout(run_dir)
    if not (run.data / "meta.json").exists():
        print(pipeline.generate(run, preset), flush=True)
    if not PreprocessLayout(run.data).is_current():  # none yet, or of older code
        print(pipeline.preprocess(run), flush=True)


def _single(run_dir: Path, preset: str, max_steps: int | None) -> dict[str, Any]:
    """Runs in its own process so its peak RSS is its own."""
    import torch

    from feedrec.data import PreprocessLayout
    from feedrec.runtime import RunLayout
    from feedrec.runtime.peak_rss import peak_rss_mb
    from feedrec.training.config import PRESETS
    from feedrec.training.single_process import train_single_process

    cfg = PRESETS[preset]["ranker"].with_overrides(epochs=1)
    torch.set_num_threads(int(cfg.cpus_per_worker * cfg.num_workers))  # the same 2 cores
    result = train_single_process(
        cfg, PreprocessLayout(RunLayout(run_dir).data), max_steps=max_steps, validate=False
    )
    peak = peak_rss_mb()
    return {
        "samples_per_s": result.samples_per_s,
        "peak_rss_mb": peak,
        "phases_s": _phases(result.history[-1]),
    }


def _phases(epoch: dict[str, float]) -> dict[str, float]:
    """The epoch's seconds per step phase (``feedrec.training.step_timer``)."""
    from feedrec.training.step_timer import PHASES

    return {name: epoch[f"seconds_{name}"] for name in PHASES}


def _ray_dmp(run_dir: Path, preset: str) -> dict[str, Any]:
    from feedrec.artifacts import load_artifact
    from feedrec.data import PreprocessLayout
    from feedrec.runtime import RunLayout, init_ray
    from feedrec.training.config import PRESETS
    from feedrec.training.trainer import train_model

    run = RunLayout(run_dir)
    cfg = PRESETS[preset]["ranker"].with_overrides(epochs=1)
    init_ray()
    out = train_model(
        cfg, PreprocessLayout(run.data), run.root / "bench_ranker", storage_dir=run.ray_results
    )
    last = load_artifact(out).metadata["history"][-1]
    return {
        # Every rank trains the same number of batches in parallel; rank 0 times its loop.
        "samples_per_s": last["samples_per_s_per_worker"] * cfg.num_workers,
        "peak_rss_mb": last["peak_rss_mb"],
        "workers": cfg.num_workers,
        "phases_s": _phases(last),  # rank 0's
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="small", choices=["debug", "small", "large", "large_tables"]
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench"))
    parser.add_argument("--single-max-steps", type=int, default=None, help="cap the baseline")
    parser.add_argument("--single-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single_only:
        print(json.dumps(_single(args.run_dir, args.preset, args.single_max_steps)))
        return
    _prepare(args.run_dir, args.preset)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "bench.train", "--single-only", "--preset", args.preset]
    cmd += ["--run-dir", str(args.run_dir)]
    if args.single_max_steps:
        cmd += ["--single-max-steps", str(args.single_max_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    single = json.loads(out.strip().splitlines()[-1])
    ray_dmp = _ray_dmp(args.run_dir, args.preset)
    ratio = ray_dmp["samples_per_s"] / single["samples_per_s"]
    result = {
        "ray_dmp_samples_per_s": round(ray_dmp["samples_per_s"], 1),
        "single_samples_per_s": round(single["samples_per_s"], 1),
        "ratio": round(ratio, 3),
        "peak_rss_mb": {
            "ray_dmp_worker": round(ray_dmp["peak_rss_mb"], 1),
            "single": round(single["peak_rss_mb"], 1),
        },
        # Where each side's epoch went: Ray DMP rank 0 (1 thread, batch per worker) and the
        # single process (all threads, the global batch). forward holds the all-to-alls.
        "phases_s": {"ray_dmp_rank0": ray_dmp["phases_s"], "single": single["phases_s"]},
        "preset": args.preset,
        "workers": ray_dmp["workers"],
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{'':24}{'samples/s':>12}{'peak RSS MB':>14}")
    for name, row in (("single TorchRec process", single), ("Ray Train DMP x2", ray_dmp)):
        print(f"{name:24}{row['samples_per_s']:>12.0f}{row['peak_rss_mb']:>14.0f}")
    print(f"ratio (Ray DMP / single): {ratio:.2f}x (goal >= 1.3x)")
    print(f"\nseconds per phase of the epoch{'':>10}{'Ray DMP rank 0':>16}{'single':>10}")
    for name, seconds in ray_dmp["phases_s"].items():
        print(f"{name:40}{seconds:>16.1f}{single['phases_s'][name]:>10.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
