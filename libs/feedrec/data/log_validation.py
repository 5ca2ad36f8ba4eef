"""Validation of the impression logs before preprocess reads them: bad rows are set aside with
their reason, never silently dropped.

Logs arrive from the generator, from ``feedrec logs import`` and from the event sink, and in
production from delivery pipelines that replay, reorder and corrupt. Every file of every counted
day (``logs/day=D/*.parquet``, D < ``n_days``) is checked by a Ray task:

* the file must be Parquet with every column of ``LOG_SCHEMA``, each castable to its type;
  otherwise every row of it is quarantined with the reason (an unreadable file is listed in
  the summary, since it has no rows to copy);
* each row: no nulls; ids within the entity tables; ``position`` >= 0; binary labels 0 or 1;
  ``dwell`` finite and >= 0 (and 0 without a view); ``propensity`` in (0, 1]; ``ts`` finite and
  inside its day partition ``[D, D + 1)``: an earlier time is a *late* event (it arrived after
  its day was cut), a later one a misfiled event;
* each ``impression_id`` at most once over all files: the first copy in (file path, row)
  order is kept, later ones are duplicates.

The driver holds 13 bytes per logged row for the duplicate check: the id and its file and row.
A file with bad rows is replaced, for the rest of the job, by a cleaned copy under
``<data>/validated_logs/day=D/``. Its bad rows go to ``<data>/quarantine/day=D/`` as text, with
``_reason``, ``_source_file`` and ``_source_row``. Clean files are read in place. Both output
trees are rebuilt on every run, so a re-run is idempotent.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from feedrec.data.log_import import BINARY_LABELS, LOG_SCHEMA

#: Row problems, in the order they are checked (a row is reported with its first problem).
REASONS = (
    "null value",
    "user_id unknown",
    "post_id unknown",
    "negative position",
    "label not 0 or 1",
    "bad dwell",
    "propensity not in (0, 1]",
    "late: ts before its day",
    "misfiled: ts after its day",
    "duplicate impression_id",
)
DUPLICATE = REASONS.index("duplicate impression_id") + 1  # codes: 0 = ok, i + 1 = REASONS[i]


@dataclass(frozen=True)
class LogValidation:
    """The outcome. files: the Parquet files preprocess reads (clean originals and cleaned
    copies); rows / kept: logged and usable rows; quarantined: reason -> rows set aside;
    unreadable: file -> error for files with no readable rows."""

    files: list[str]
    rows: int
    kept: int
    quarantined: dict[str, int] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    quarantine_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["files"]
        out["files_read"] = len(self.files)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogValidation:
        """From :meth:`to_dict` (the preprocess meta): the file list is not kept there."""
        return cls(
            files=[],
            rows=int(d["rows"]),
            kept=int(d["kept"]),
            quarantined=dict(d["quarantined"]),
            unreadable=dict(d["unreadable"]),
            quarantine_dir=str(d["quarantine_dir"]),
        )

    def summary(self) -> str:
        bad = sum(self.quarantined.values())
        if not bad and not self.unreadable:
            return f"logs: {self.rows:,} rows, all valid"
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.quarantined.items()))
        text = f"logs: {self.rows:,} rows, {bad:,} quarantined in {self.quarantine_dir}"
        text += f" ({reasons})" if reasons else ""
        if self.unreadable:
            text += f"; {len(self.unreadable)} unreadable file(s): {sorted(self.unreadable)}"
        return text


def problem_codes(table: pa.Table, day: int, n_users: int, n_posts: int) -> np.ndarray:
    """int8 [N] problem code per row of a table already cast to ``LOG_SCHEMA``."""
    n = table.num_rows
    code = np.zeros(n, np.int8)

    def flag(mask: np.ndarray, reason: str) -> None:
        code[(code == 0) & mask] = REASONS.index(reason) + 1

    nulls = np.zeros(n, bool)
    for name in LOG_SCHEMA.names:
        nulls |= table.column(name).is_null().to_numpy(zero_copy_only=False)
    flag(nulls, "null value")

    def values(name: str, fill: float = 0) -> np.ndarray:
        return pc.fill_null(table.column(name), fill).to_numpy()

    user, post = values("user_id"), values("post_id")
    flag((user < 0) | (user >= n_users), "user_id unknown")
    flag((post < 0) | (post >= n_posts), "post_id unknown")
    flag(values("position") < 0, "negative position")
    labels = np.stack([values(label) for label in BINARY_LABELS], axis=1)
    flag(((labels != 0) & (labels != 1)).any(axis=1), "label not 0 or 1")
    dwell, view = values("dwell"), values("view")
    flag(~np.isfinite(dwell) | (dwell < 0) | ((view == 0) & (dwell > 0)), "bad dwell")
    propensity = values("propensity", 1.0)
    flag(~((propensity > 0) & (propensity <= 1)), "propensity not in (0, 1]")
    ts = values("ts", float(day))
    flag(~np.isfinite(ts) | (ts < day), "late: ts before its day")
    flag(ts >= day + 1, "misfiled: ts after its day")
    return code


@ray.remote(scheduling_strategy="SPREAD")  # file by file over every node
def _check_file(path: str, day: int, n_users: int, n_posts: int) -> dict[str, Any]:
    """Phase 1: ids and problem codes of one file's rows (or why it is unusable)."""
    try:
        table = pq.read_table(path, partitioning=None)
    except Exception as e:  # a corrupt or non-Parquet file: nothing to copy
        return {"unreadable": f"{type(e).__name__}: {e}"}
    missing = [f.name for f in LOG_SCHEMA if f.name not in table.column_names]
    if missing:
        return {"rows": table.num_rows, "file_problem": f"missing column(s) {missing}"}
    try:
        table = table.select(LOG_SCHEMA.names).cast(LOG_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        return {"rows": table.num_rows, "file_problem": f"wrong column type: {e}"}
    ids = pc.fill_null(table.column("impression_id"), -1).to_numpy()
    return {
        "rows": table.num_rows,
        "ids": ids,
        "codes": problem_codes(table, day, n_users, n_posts),
    }


def _as_text(table: pa.Table) -> pa.Table:
    """Every column as a string (a quarantined row is kept as it came, whatever its types)."""
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        try:
            columns[name] = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            columns[name] = pa.array([None if v is None else str(v) for v in column.to_pylist()])
    return pa.table(columns)


@ray.remote(scheduling_strategy="SPREAD")  # file by file over every node
def _split_file(
    path: str, codes: np.ndarray | None, file_problem: str, clean: str, quarantine: str
) -> None:
    """Phase 2: a cleaned copy (rows with code 0) at ``clean`` (unless "") and the
    quarantine table of one file."""
    table = pq.read_table(path, partitioning=None)
    if codes is None:  # the whole file is unusable
        bad, reasons = table, [file_problem] * table.num_rows
        rows = np.arange(table.num_rows)
    else:
        keep = codes == 0
        rows = np.flatnonzero(~keep)
        if clean:
            good = table.select(LOG_SCHEMA.names).cast(LOG_SCHEMA).filter(pa.array(keep))
            Path(clean).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(good, clean)
        bad = table.take(pa.array(rows))
        reasons = [REASONS[c - 1] for c in codes[rows].tolist()]
    out = _as_text(bad).append_column("_reason", pa.array(reasons, pa.string()))
    out = out.append_column("_source_file", pa.array([path] * len(rows), pa.string()))
    out = out.append_column("_source_row", pa.array(rows, pa.int64()))
    Path(quarantine).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(out, quarantine)


def day_files(logs: Path, n_days: int) -> list[tuple[str, int]]:
    """(path, day) of every file of the counted days, in a fixed order."""
    files = []
    for day in range(n_days):
        for path in sorted((logs / f"day={day}").glob("*.parquet")):
            files.append((str(path), day))
    return files


def validate_logs(
    logs: Path, n_days: int, n_users: int, n_posts: int, out_dir: Path
) -> LogValidation:
    """Check every file of days ``0 .. n_days-1`` under ``logs`` (Ray must be initialised);
    writes ``out_dir/validated_logs``, ``out_dir/quarantine`` and ``out_dir/validation.json``."""
    clean_root, quarantine_root = out_dir / "validated_logs", out_dir / "quarantine"
    for root in (clean_root, quarantine_root):
        shutil.rmtree(root, ignore_errors=True)  # rebuilt from scratch: re-runs are idempotent
    files = day_files(logs, n_days)
    checks = ray.get([_check_file.remote(p, d, n_users, n_posts) for p, d in files])
    for check in checks:  # from the object store: read-only until copied
        if "codes" in check:
            check["codes"] = check["codes"].copy()

    # Duplicates: the first copy of an id in (file, row) order is kept.
    parts = [(i, c["ids"]) for i, c in enumerate(checks) if "ids" in c]
    if parts:
        ids = np.concatenate([p for _, p in parts])
        where = np.concatenate([np.full(len(p), i, np.int32) for i, p in parts])
        row = np.concatenate([np.arange(len(p), dtype=np.int32) for _, p in parts])
        valid = np.concatenate([checks[i]["codes"] == 0 for i, _ in parts])
        order = np.lexsort((row, where, ids))  # stable: ties keep (file, row) order
        order = order[valid[order]]
        later = np.zeros(len(order), bool)
        later[1:] = ids[order][1:] == ids[order][:-1]
        dup = order[later]  # one assignment per file that has duplicates, not per row
        for i in np.unique(where[dup]).tolist():
            checks[i]["codes"][row[dup][where[dup] == i]] = DUPLICATE
        del ids, where, row, valid, order, later

    read: list[str] = []
    splits = []
    quarantined: Counter[str] = Counter()
    unreadable: dict[str, str] = {}
    rows = 0
    for (path, day), check in zip(files, checks, strict=True):
        if "unreadable" in check:
            unreadable[path] = check["unreadable"]
            continue
        rows += check["rows"]
        name = Path(path).name
        clean = str(clean_root / f"day={day}" / name)
        quarantine = str(quarantine_root / f"day={day}" / name)
        if "file_problem" in check:
            quarantined[check["file_problem"]] += check["rows"]
            splits.append(_split_file.remote(path, None, check["file_problem"], clean, quarantine))
            continue
        codes = check["codes"]
        if not codes.any():
            read.append(path)
            continue
        for code, count in zip(*np.unique(codes[codes > 0], return_counts=True), strict=True):
            quarantined[REASONS[int(code) - 1]] += int(count)
        if (codes == 0).any():
            read.append(clean)
        else:
            clean = ""  # nothing usable: no copy
        splits.append(_split_file.remote(path, codes, "", clean, quarantine))
    ray.get(splits)
    result = LogValidation(
        files=sorted(read),
        rows=rows,
        kept=rows - sum(quarantined.values()),
        quarantined=dict(quarantined),
        unreadable=unreadable,
        quarantine_dir=str(quarantine_root),
    )
    (out_dir / "validation.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result
