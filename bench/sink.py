"""The event sink's memory and speed against the bus it compacts, at two backlog sizes.

    python -m bench.sink --feeds 10000 --scale 4      # make bench-sink

Builds two embedded buses of served feeds, N and ``scale`` x N, in the shape the Ingress
records (50 slots, a score per task, every fifth feed an exploring one with a 200-post pool;
impression and view events for half the feeds), all inside one attribution window: the worst
case, where every feed is still open when the sink reaches the end of the bus. Then, each in a
fresh process so that its peak RSS is its own:

* **read**: one pass over the bus parsing every record, the least any compaction does
  (the baseline);
* **sink**: ``EventSink.run(flush=True)``, every feed written to the log and exposure files.

Prints, per size, records/s and peak RSS of both, and two ratios: the sink's peak RSS at the
large backlog over the small one (flat memory: about 1; before open feeds were kept as keys
it grew with the backlog: 4.87 GiB on the demo's 67k feeds), and the sink's records/s over
the read's. Writes ``bench/results/sink.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.measurement import in_fresh_process, write_result
from bench.report import SINK_RSS_RATIO_GOAL

RESULTS = Path(__file__).resolve().parent / "results" / "sink.json"
SLOTS = 50
POOL = 200


def _records(feeds: range, start: float, spacing_s: float = 0.01) -> list[dict[str, Any]]:
    """The served feeds numbered ``feeds`` (feed i received at ``start + i * spacing_s``),
    and events for every other one, in bus order."""
    from feedrec.events.feed_event import event_record, feed_event, served_record
    from feedrec.schema.registry import TASKS

    out: list[dict[str, Any]] = []
    for i in feeds:
        rid = f"{i:032x}"
        posts = [(i * 7919 + j * 104729) % 1_000_000 for j in range(SLOTS)]
        explore = i % 5 == 0
        out.append(
            served_record(
                request_id=rid,
                user_id=i % 20_000,
                ts=14.5,
                received_at=start + i * spacing_s,
                variant="explore" if explore else "control",
                model_version="3",
                snapshot="day14-bench",
                fallback=False,
                cold_start=False,
                latency_ms=30.0,
                items=[
                    {
                        "post_id": post,
                        "position": j,
                        "score": 1.0 / (j + 1),
                        "scores": {task: 0.5 / (j + 1) for task in TASKS},
                        "propensity": 0.5 if explore else 1.0,
                    }
                    for j, post in enumerate(posts)
                ],
                pool=[(i + k * 31) % 1_000_000 for k in range(POOL)] if explore else None,
                explored=explore,
            )
        )
        if i % 2 == 0:
            for kind in ("impression", "view"):
                event = feed_event(
                    request_id=rid,
                    type=kind,
                    position=0,
                    post_id=posts[0],
                    user_id=i % 20_000,
                    variant="explore" if explore else "control",
                    idempotency_key=f"{kind}-{rid}",
                )
                out.append(event_record(event, start + (i + 0.5) * spacing_s))
    return out


def build_bus(
    root: Path, n_feeds: int, batch: int = 500, spacing_s: float = 0.01, start: float | None = None
) -> int:
    """Write the synthetic bus at ``root``, ``batch`` feeds at a time, feeds ``spacing_s``
    apart from ``start`` (default: now); returns its bytes."""
    from feedrec.events.event_log import EventLog

    log = EventLog(root, fsync=False)  # a benchmark's input, not a service's acknowledgement
    start = time.time() if start is None else start
    for first in range(0, n_feeds, batch):
        records = _records(range(first, min(first + batch, n_feeds)), start, spacing_s)
        log.append(records)
    return sum(p.stat().st_size for p in root.glob("segment-*.log"))


def child(mode: str, bus: Path, world: Path) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    from feedrec.events.event_log import EventLog
    from feedrec.events.event_sink import EventSink
    from feedrec.runtime.peak_rss import peak_rss_mb

    log = EventLog(bus)
    t = time.perf_counter()
    if mode == "read":
        records = sum(1 for _ in log.records(0))
        out: dict[str, Any] = {"records": records}
    else:
        report = EventSink(log, world).run(flush=True)
        records = report.records
        out = {"records": records, "feeds": report.feeds_written}
        out["exposure_rows"] = report.exposure_rows
    wall = time.perf_counter() - t
    out |= {
        "wall_s": round(wall, 2),
        "records_per_s": round(records / wall, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    return out


def _measure(mode: str, bus: Path, world: Path) -> dict[str, Any]:
    return in_fresh_process("bench.sink", "--child", mode, "--bus", str(bus), "--world", str(world))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feeds", type=int, default=10_000, help="feeds on the small bus")
    parser.add_argument("--scale", type=int, default=4, help="the large bus: this many x")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=("read", "sink"), help=argparse.SUPPRESS)
    parser.add_argument("--bus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.bus, args.world)))
        return
    if args.feeds < 1 or args.scale < 2:
        parser.error("--feeds must be >= 1 and --scale >= 2")
    t0 = time.perf_counter()
    sizes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="feedrec-bench-sink-") as tmp:
        for label, n in (("small", args.feeds), ("large", args.feeds * args.scale)):
            bus, world = Path(tmp) / label / "bus", Path(tmp) / label / "world"
            size = build_bus(bus, n)
            read = _measure("read", bus, world)
            sink = _measure("sink", bus, world)
            sizes[label] = {"feeds": n, "bus_mb": round(size / 2**20, 1), "read": read}
            sizes[label]["sink"] = sink
            print(
                f"{label}: {n} feeds, {read['records']} records, {size / 2**20:.0f} MB of bus; "
                f"read {read['records_per_s']:,.0f} rec/s, {read['peak_rss_mb']:.0f} MB peak; "
                f"sink {sink['records_per_s']:,.0f} rec/s, {sink['peak_rss_mb']:.0f} MB peak "
                f"({sink['exposure_rows']:,} exposure rows)",
                flush=True,
            )
    small, large = sizes["small"], sizes["large"]
    rss_ratio = large["sink"]["peak_rss_mb"] / small["sink"]["peak_rss_mb"]
    speed = large["sink"]["records_per_s"] / large["read"]["records_per_s"]
    print(
        f"sink peak RSS, {args.scale}x the backlog: {rss_ratio:.2f}x "
        f"(goal <= {SINK_RSS_RATIO_GOAL}); sink records/s over a bare read: {speed:.2f}"
    )
    result = {
        "rss_ratio": round(rss_ratio, 3),
        "sink_over_read_speed": round(speed, 3),
        "scale": args.scale,
        "sizes": sizes,
    }
    write_result(args.out, result, t0)


if __name__ == "__main__":
    main()
