"""A replica's start: its real-time signals catching up with the bus, with and without a
snapshot, at two bus lengths.

    python -m bench.signals --feeds 20000 --scale 4      # make bench-signals

Builds two embedded buses of served feeds (the shape the Ingress records, from
``bench.sink``) at 40 feeds/s, N and ``scale`` x N feeds long, all within the last
``REPLAY_S``. Then, each in a fresh process so that its time and peak RSS are its own:

* **replay** (the baseline, what a replica did before snapshots): ``RealtimeSignals.follow``
  on the bus without a snapshot, so it applies every record of the last ``REPLAY_S``;
* **save**: the state after all but the last ``SNAPSHOT_EVERY`` records, saved as the bus's
  snapshot (the worst case a follower leaves: the next save is due);
* **restore**: ``follow`` again, now restoring that snapshot and applying the rest.

Prints, per size, the start of each and their ratio (replay over restore), and the restore's
start at the long bus over the short one: the replay grows with the bus, the restore with the
feeds inside the attribution window (at most ``ATTRIBUTION_WINDOW_S`` x the feed rate) plus
``SNAPSHOT_EVERY`` records.

The replica's other start-up read of the bus is its writer's idempotency-key index
(``EventLog.catch_up``). Measured the same way: **index** with the full segments' key files,
then **index_scan** with them hidden, which reads every record as a writer did before key
files (and writes the key files again, as a first start on an older bus does).
Writes ``bench/results/signals.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.measurement import in_fresh_process, write_result
from bench.sink import build_bus

RESULTS = Path(__file__).resolve().parent / "results" / "signals.json"
FEEDS_PER_S = 40.0  # about the Serve chain's capacity on this machine (README, bench-serve)
POSTS, USERS = 1_000_000, 20_000  # bench.sink's ids


def _signals() -> Any:
    import numpy as np

    from feedrec.serving.realtime_signals import RealtimeSignals

    return RealtimeSignals(np.arange(POSTS) % 50, np.zeros(USERS, np.int64))


def child(mode: str, bus: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    from feedrec.events.event_log import EventLog
    from feedrec.runtime.peak_rss import peak_rss_mb
    from feedrec.serving.realtime_signals import SNAPSHOT_EVERY, SNAPSHOT_NAME

    log = EventLog(bus)
    if mode in ("index", "index_scan"):
        t = time.perf_counter()
        log.catch_up()
        return {
            "start_s": round(time.perf_counter() - t, 3),
            "keys": len(log._keys),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
    signals = _signals()
    t = time.perf_counter()
    out: dict[str, Any] = {}
    if mode == "save":
        stop_at = max(log.end_seq() - SNAPSHOT_EVERY, 0)
        for record in log.records(0):
            if record.seq >= stop_at:
                break
            signals.apply(record.payload)
        signals.next_seq = stop_at
        applied = time.perf_counter()
        data = signals.snapshot()
        log.save_snapshot(SNAPSHOT_NAME, stop_at, data)
        out |= {"seq": stop_at, "snapshot_mb": round(len(data) / 2**20, 2)}
        out["save_s"] = round(time.perf_counter() - applied, 3)
    else:
        stop = threading.Event()
        stop.set()  # the start only: no polling thread work
        signals.follow(log, stop=stop, snapshot_every=0)
        out["start_s"] = round(time.perf_counter() - t, 3)
        out["restored_from"] = signals.restored_from
    out |= {
        "next_seq": signals.next_seq,
        "served_in_window": len(signals._served),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    return out


def _measure(mode: str, bus: Path) -> dict[str, Any]:
    return in_fresh_process("bench.signals", "--child", mode, "--bus", str(bus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feeds", type=int, default=20_000, help="feeds on the short bus")
    parser.add_argument("--scale", type=int, default=4, help="the long bus: this many x")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--child",
        choices=("replay", "save", "restore", "index", "index_scan"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--bus", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.bus)))
        return
    if args.feeds < 1 or args.scale < 2:
        parser.error("--feeds must be >= 1 and --scale >= 2")
    t0 = time.perf_counter()
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="feedrec-bench-signals-") as tmp:
        for label, n in (("short", args.feeds), ("long", args.feeds * args.scale)):
            bus = Path(tmp) / label
            # The bus ends a minute ago: all of it within the replay horizon (8 h).
            start = time.time() - 60 - n / FEEDS_PER_S
            size = build_bus(bus, n, spacing_s=1 / FEEDS_PER_S, start=start)
            replay = _measure("replay", bus)
            save = _measure("save", bus)
            restore = _measure("restore", bus)
            if restore["restored_from"] != save["seq"]:
                raise SystemExit(f"{label}: the restore did not start from the saved snapshot")
            sizes[label] = {"feeds": n, "bus_mb": round(size / 2**20, 1), "replay": replay}
            sizes[label] |= {"save": save, "restore": restore}
            sizes[label]["replay_over_restore"] = round(replay["start_s"] / restore["start_s"], 2)
            index = _measure("index", bus)
            hidden = [p.rename(p.with_suffix(".hidden")) for p in bus.glob("segment-*.keys")]
            index_scan = _measure("index_scan", bus)
            for path in hidden:
                path.unlink()
            sizes[label] |= {"index": index, "index_scan": index_scan}
            sizes[label]["index_speedup"] = round(index_scan["start_s"] / index["start_s"], 2)
            print(
                f"{label}: {n} feeds, {replay['next_seq']:,} records, {size / 2**20:.0f} MB of "
                f"bus; replay {replay['start_s']:.2f} s ({replay['peak_rss_mb']:.0f} MB); "
                f"snapshot {save['snapshot_mb']:.1f} MB of {save['served_in_window']:,} feeds in "
                f"the window, saved in {save['save_s']:.2f} s; restore + "
                f"{replay['next_seq'] - save['seq']:,} records {restore['start_s']:.2f} s "
                f"({restore['peak_rss_mb']:.0f} MB): {sizes[label]['replay_over_restore']:.1f}x; "
                f"writer's key index of {index['keys']:,} keys: {len(hidden)} key files "
                f"{index['start_s']:.2f} s ({index['peak_rss_mb']:.0f} MB), scanning the "
                f"records {index_scan['start_s']:.2f} s ({index_scan['peak_rss_mb']:.0f} MB): "
                f"{sizes[label]['index_speedup']:.1f}x",
                flush=True,
            )
    short, long = sizes["short"], sizes["long"]
    growth = {
        mode: round(long[mode]["start_s"] / short[mode]["start_s"], 2)
        for mode in ("replay", "restore")
    }
    print(
        f"start at {args.scale}x the bus: replay {growth['replay']:.2f}x, restore "
        f"{growth['restore']:.2f}x; on the long bus the snapshot starts "
        f"{long['replay_over_restore']:.1f}x faster"
    )
    print(f"writer's key index on the long bus: {long['index_speedup']:.1f}x faster with key files")
    result = {
        "speedup": long["replay_over_restore"],
        "index_speedup": long["index_speedup"],
        "start_growth": growth,
        "scale": args.scale,
        "feeds_per_s": FEEDS_PER_S,
        "sizes": sizes,
    }
    write_result(args.out, result, t0)


if __name__ == "__main__":
    main()
