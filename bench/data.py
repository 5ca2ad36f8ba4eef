"""Data pipeline throughput: the Ray Data preprocess job vs the same transforms in one process.

    make bench-data            # = python -m bench.data --preset small --run-dir runs/bench-data

Both sides turn the same generated log files into the same outputs, with the same library
functions:

* validation (``log_validation.problem_codes``: nulls, ids, labels, dwell, propensity, day);
* sparse per-day sums (``DailySums.add``) and the point-in-time tables (``DailySums.tables``);
* vocabularies (``fit_vocabularies``) and the time split (``split_of``);
* the point-in-time join (``join_examples``), each day against its statistics (``join_stats``);
* examples written to Parquet per split, plus the retrieval pairs.

The Ray side is ``run_preprocess``: Ray Data streaming, tasks on every core. The single
process is pyarrow + numpy: it reads every file into memory, then joins day by day in 16k-row
batches.
Each side runs in its own subprocess. Its peak memory is the largest sum of RSS over its process
tree, sampled every 0.2 s. For Ray the tree holds the driver, GCS, raylet and workers; pages of
the shared object store count once per process that maps them.

Prints both side by side and writes ``bench/results/data.json`` (``data_<preset>.json`` for
another preset than ``small``):
``{"ray_data_rows_per_s", "single_rows_per_s", "ratio", "peak_mb", "rows", ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_path(preset: str) -> Path:
    """``data.json`` for the standard ``small`` run (what the report reads), else
    ``data_<preset>.json``."""
    return RESULTS_DIR / ("data.json" if preset == "small" else f"data_{preset}.json")


GOAL = 0.8


def _tree_rss_mb(root: int) -> float:
    """Sum of VmRSS (MiB) of ``root`` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields["PPid"].strip())
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(rss.get(p, 0) for p in tree) / 1024.0


def _machine_used_mb() -> float:
    """MemTotal - MemAvailable (MiB): memory in use machine-wide, shared pages counted once."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return (info["MemTotal"] - info["MemAvailable"]) / 1024.0


def _prepare(run_dir: Path, preset: str) -> None:
    from feedrec import pipeline
    from feedrec.runtime import RunLayout

    run = RunLayout(run_dir)
    if not (run.world / "world.json").exists():
        print(pipeline.generate(run, preset), flush=True)


def _ray_side(run_dir: Path) -> dict[str, Any]:
    from feedrec.data import PreprocessConfig, PreprocessLayout, run_preprocess
    from feedrec.runtime import RunLayout, init_ray

    run = RunLayout(run_dir)
    init_ray()  # cluster start-up is not preprocessing
    started = time.perf_counter()
    run_preprocess(PreprocessConfig(run.world, run.root / "data_ray", progress=False))
    seconds = time.perf_counter() - started
    meta = PreprocessLayout(run.root / "data_ray").read_meta()
    return {"seconds": seconds, "rows": meta["validation"]["rows"], "examples": meta["rows"]}


def _single_side(run_dir: Path) -> dict[str, Any]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from feedrec.data.examples import EXAMPLE_SCHEMA, arrow_from_columns
    from feedrec.data.log_import import LOG_SCHEMA
    from feedrec.data.log_validation import day_files, problem_codes
    from feedrec.data.preprocess import (
        POSITIVE_LABELS,
        DailySums,
        PreprocessConfig,
        fit_vocabularies,
        join_examples,
        join_stats,
        load_entity_attributes,
        split_of,
    )
    from feedrec.features.tables import FeatureSnapshot
    from feedrec.runtime import RunLayout
    from feedrec.world.generator import load_world_config
    from feedrec.world.layout import WorldLayout

    run = RunLayout(run_dir)
    started = time.perf_counter()
    world = WorldLayout(run.world)
    world_cfg = load_world_config(world)
    defaults = PreprocessConfig(run.world, run.root / "data_single")
    n_days = world_cfg.n_days
    train_days = n_days - defaults.valid_days - defaults.test_days
    attrs = load_entity_attributes(world)
    parts, rows = [], 0
    for path, day in day_files(world.logs, n_days):
        table = pq.read_table(path, partitioning=None).select(LOG_SCHEMA.names).cast(LOG_SCHEMA)
        rows += table.num_rows
        codes = problem_codes(table, day, attrs.n_users, attrs.n_posts)
        table = table.filter(pa.array(codes == 0))
        parts.append(table.append_column("day", pa.array(np.full(table.num_rows, day))))
    logs = pa.concat_tables(parts)
    del parts
    ids = logs.column("impression_id").to_numpy()
    first = np.unique(ids, return_index=True)[1]
    if len(first) < len(ids):
        keep = np.zeros(len(ids), bool)
        keep[first] = True
        logs = logs.filter(pa.array(keep))
    batch = {name: logs.column(name).to_numpy() for name in logs.column_names}
    batch["topic"] = attrs.post_topic[batch["post_id"]]
    batch["creator_id"] = attrs.post_creator[batch["post_id"]]
    sums = DailySums(attrs, n_days, world_cfg.n_topics)
    sums.add(batch)
    tables = sums.tables()
    seen, hidden = sums.pairs()
    vocabs = fit_vocabularies(tables, train_days)
    out = run.root / "data_single"
    out.mkdir(parents=True, exist_ok=True)
    tables.save(out / "tables.npz")
    vocabs.save(out / "vocabularies.npz")
    np.save(out / "seen.npy", seen)
    np.save(out / "hidden.npy", hidden)
    schema = EXAMPLE_SCHEMA.append(pa.field("split", pa.string()))
    split = split_of(batch["day"], n_days, defaults.valid_days, defaults.test_days)
    writers: dict[str, pq.ParquetWriter] = {}
    counts: dict[str, int] = {}
    positives = []
    # Day by day, each against that day's statistics (as preprocess does), in 16384-row slices.
    order = np.argsort(batch["day"], kind="stable")
    batch = {k: v[order] for k, v in batch.items()}
    split = split[order]
    day_starts = np.searchsorted(batch["day"], np.arange(n_days + 1))
    slices = [
        (d, slice(a, min(a + 16384, day_starts[d + 1])))
        for d in range(n_days)
        for a in range(day_starts[d], day_starts[d + 1], 16384)
    ]
    snapshots: dict[int, FeatureSnapshot] = {}
    for d, rows_slice in slices:
        if d not in snapshots:
            snapshots = {d: FeatureSnapshot(join_stats(tables, d), attrs)}
        part = {k: v[rows_slice] for k, v in batch.items()}
        chunk = arrow_from_columns(join_examples(part, snapshots[d], split[rows_slice]), schema)
        for name in np.unique(chunk.column("split").to_numpy(zero_copy_only=False)):
            rows_of = chunk.filter(pc.equal(chunk.column("split"), name))
            if name not in writers:
                (out / f"split={name}").mkdir(exist_ok=True)
                writers[name] = pq.ParquetWriter(out / f"split={name}" / "part.parquet", schema)
            writers[name].write_table(rows_of)
            counts[name] = counts.get(name, 0) + rows_of.num_rows
            if name == "train":
                engaged = np.zeros(rows_of.num_rows, bool)
                for label in POSITIVE_LABELS:
                    engaged |= rows_of.column(label).to_numpy() > 0
                positives.append(rows_of.filter(pa.array(engaged)))
    for writer in writers.values():
        writer.close()
    pq.write_table(pa.concat_tables(positives), out / "pairs.parquet")
    return {"seconds": time.perf_counter() - started, "rows": rows, "examples": counts}


def _measure(side: str, run_dir: Path, limit_gb: float | None = None) -> dict[str, Any]:
    """Run one side in a subprocess; its result plus the peak RSS of its process tree.

    With ``limit_gb`` the subprocess gets that address-space limit (RLIMIT_AS, Arrow on the
    system allocator so that reserved and used memory agree): a side that needs more fails
    with MemoryError instead of driving the machine out of memory. Its result is then
    ``{"failed": ...}`` with the peak reached.
    """
    cmd = [sys.executable, "-m", "bench.data", "--side", side, "--run-dir", str(run_dir)]
    env, limit = dict(os.environ), None
    if limit_gb is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        size = int(limit_gb * (1 << 30))

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=limit)
    peak, machine_peak, machine_base = 0.0, 0.0, _machine_used_mb()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, machine_peak
        while not stop.is_set():
            peak = max(peak, _tree_rss_mb(proc.pid))
            machine_peak = max(machine_peak, _machine_used_mb() - machine_base)
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        if limit_gb is not None:
            failed = f"exit {proc.returncode} at a {limit_gb} GB limit"
            return {"failed": failed, "peak_mb": peak, "machine_peak_mb": machine_peak}
        raise RuntimeError(f"the {side} side failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = peak
    result["machine_peak_mb"] = machine_peak
    return result


def _write_failed_single(
    preset: str, single: dict[str, Any], ray_data: dict[str, Any], started: float
) -> None:
    """Results when the single process could not finish within its memory limit."""
    result = {
        "ray_data_rows_per_s": round(ray_data["rows"] / ray_data["seconds"], 1),
        "single_failed": single["failed"],
        "rows": ray_data["rows"],
        "examples": ray_data["examples"],
        "seconds": {"ray_data": round(ray_data["seconds"], 1)},
        "peak_mb": {"ray_data": round(ray_data["peak_mb"]), "single": round(single["peak_mb"])},
        "machine_peak_mb": {
            "ray_data": round(ray_data["machine_peak_mb"]),
            "single": round(single["machine_peak_mb"]),
        },
        "preset": preset,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"single process: {single['failed']} (peak {single['peak_mb']:.0f} MB)")
    rate, peak = result["ray_data_rows_per_s"], ray_data["peak_mb"]
    print(f"Ray Data: {rate:.0f} rows/s, peak {peak:.0f} MB")
    out = results_path(preset)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="small", choices=["debug", "small", "large", "large_tables"]
    )
    parser.add_argument("--run-dir", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--side", choices=["ray", "single"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--single-limit-gb",
        type=float,
        default=None,
        help="address-space limit of the single process (large presets: fail, not OOM)",
    )
    args = parser.parse_args()
    if args.side:
        side = _ray_side if args.side == "ray" else _single_side
        print(json.dumps(side(args.run_dir), default=int))
        return
    _prepare(args.run_dir, args.preset)
    started = time.perf_counter()
    single = _measure("single", args.run_dir, args.single_limit_gb)
    ray_data = _measure("ray", args.run_dir)
    if "failed" in single:
        _write_failed_single(args.preset, single, ray_data, started)
        return
    if single["examples"] != ray_data["examples"]:
        raise RuntimeError(f"the sides disagree: {single['examples']} vs {ray_data['examples']}")
    rates = {name: r["rows"] / r["seconds"] for name, r in (("ray", ray_data), ("single", single))}
    ratio = rates["ray"] / rates["single"]
    result = {
        "ray_data_rows_per_s": round(rates["ray"], 1),
        "single_rows_per_s": round(rates["single"], 1),
        "ratio": round(ratio, 3),
        "goal": GOAL,
        "rows": ray_data["rows"],
        "examples": ray_data["examples"],
        "seconds": {
            "ray_data": round(ray_data["seconds"], 1),
            "single": round(single["seconds"], 1),
        },
        "peak_mb": {"ray_data": round(ray_data["peak_mb"]), "single": round(single["peak_mb"])},
        "machine_peak_mb": {
            "ray_data": round(ray_data["machine_peak_mb"]),
            "single": round(single["machine_peak_mb"]),
        },
        "preset": args.preset,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    print(f"{'':26}{'rows/s':>12}{'seconds':>10}{'peak MB':>10}{'machine MB':>12}")
    for name, row, rate in (
        ("single process (pyarrow)", single, rates["single"]),
        ("Ray Data preprocess", ray_data, rates["ray"]),
    ):
        print(
            f"{name:26}{rate:>12.0f}{row['seconds']:>10.1f}{row['peak_mb']:>10.0f}"
            f"{row['machine_peak_mb']:>12.0f}"
        )
    print(f"ratio (Ray Data / single): {ratio:.2f}x (goal >= {GOAL}x); {result['rows']:,} rows")
    out = results_path(args.preset)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
