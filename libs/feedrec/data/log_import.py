"""Bring your own logs: import an external interaction log into the layout of a world.

An interaction log (rows of ``user, item, timestamp[, feedback...]`` in CSV or Parquet, e.g.
MovieLens ratings) is written in the layout :func:`feedrec.world.generate_world` writes
(:class:`~feedrec.world.layout.WorldLayout`), so ``preprocess``, ``train``, ``evaluate`` and
``index`` run on it unchanged:

* ``logs/day=D/part-0.parquet``: one row per interaction, with the generator's log columns
  (:data:`LOG_SCHEMA`): ``impression_id`` (0..N-1 in time order), ``ts`` (days since the start
  of day 0), ``user_id``, ``post_id``, ``position`` 0, ``propensity`` 1 and the registry labels.
  Days without interactions have no partition.
* ``entities/``: users, posts (= items), one "unknown" creator and no follows. The logs carry no
  attributes, so every user gets the unknown segment and every item the unknown topic, media type
  and creator (bucket ``0``) and a zero content embedding: models see ids and the point-in-time
  aggregates only. An item's ``created_at`` is its first interaction (it is eligible for retrieval
  from the next day on); a user's ``signup_day`` is the day of their first interaction.
* ``world.json``: a :class:`~feedrec.world.config.WorldConfig` describing that shape (one topic,
  one creator, items never expire), which is all the later stages read from it;
  ``source.json``: where the logs came from and how they were mapped (:class:`LogImport`).
* no ``truth/``: there is no ground truth, so evaluation reports the oracle as unavailable.

Ids, time and labels:

* User and item ids must be non-negative integers. They are renumbered 0..N-1 in the order of the
  source ids; ``users.parquet`` keeps ``source_user_id`` and ``posts.parquet`` ``source_item_id``.
* Timestamps are numbers (``timestamp_unit`` since the Unix epoch), ISO 8601 strings or Arrow
  timestamps/dates. Day 0 starts at the first timestamp rounded down to a multiple of
  ``day_seconds`` (UTC midnight for the default one-day length).
* ``label`` is the generic feedback column (a rating, a click) and stands for ``like``; ``view``,
  ``like``, ``comment``, ``share`` and ``hide`` map directly. A binary label is 1 where its column
  is >= its threshold (default 1). ``dwell`` is copied (seconds, >= 0). Unmapped labels are 0,
  except ``view`` (every logged interaction was seen) and, when neither ``label`` nor ``like`` is
  mapped, ``like``: implicit feedback, every interaction counts as a positive.

Validation: every mapped column of every row is checked before anything is written. Problems are
raised together as a :class:`LogImportError` naming each column, the reason, the number of bad
rows and the first few of them (CSV: line numbers, header = line 1; Parquet: 1-based row
numbers). With ``skip_bad_rows`` the bad rows are written instead to a quarantine Parquet file
next to the output (:func:`quarantine_path`, every source column as text plus ``_source_file``,
``_source_row`` and ``_problems``) and the rest is imported. Lines that contain only empty fields
carry no data and are dropped (counted as ``blank_lines``).

The import runs in one process and holds every source file in memory (CSV as text), plus the
parsed columns: a few hundred bytes per row, e.g. well under a GiB for 1M MovieLens ratings.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from feedrec.schema.registry import CONTENT_DIM, LABELS
from feedrec.world.config import WorldConfig
from feedrec.world.generator import write_table
from feedrec.world.layout import WorldLayout

Format = Literal["csv", "parquet"]
TimestampUnit = Literal["s", "ms", "us", "ns"]

#: Targets every mapping needs.
REQUIRED_TARGETS = ("user_id", "item_id", "timestamp")
#: The generic feedback column (rating, click, ...): an alias of ``like``.
LABEL_ALIAS = "label"
#: Registry labels that are 0/1 per interaction (``dwell`` is the only real-valued one).
BINARY_LABELS = tuple(label for label in LABELS if label != "dwell")
#: Everything a source column can be mapped to.
TARGETS = (*REQUIRED_TARGETS, LABEL_ALIAS, *LABELS)
#: File names read from a directory, per format.
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "csv": (".csv", ".csv.gz", ".tsv"),
    "parquet": (".parquet", ".pq"),
}
UNIT_SECONDS: dict[str, float] = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
#: Bad rows (and offending values) an error names per column.
SHOWN_ROWS = 5
#: The bucket of every attribute imported logs lack (segment, topic, media type, creator).
UNKNOWN = 0
#: The smallest world the layout allows (train, valid and test days need room).
MIN_DAYS = 4

#: Columns of ``logs/day=D/part-0.parquet``, exactly as the world generator writes them.
LOG_SCHEMA = pa.schema(
    [
        pa.field("impression_id", pa.int64()),
        pa.field("ts", pa.float64()),
        pa.field("user_id", pa.int64()),
        pa.field("post_id", pa.int64()),
        pa.field("position", pa.int64()),
        pa.field("propensity", pa.float32()),
        *[pa.field(label, pa.int8()) for label in BINARY_LABELS],
        pa.field("dwell", pa.float32()),
    ]
)

_ID_PATTERN = r"^\s*\+?(?P<id>\d{1,18})(?:\.0*)?\s*$"
_NUMBER_PATTERN = r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*$"
_REASONS = {
    "user_id": "not a non-negative integer",
    "item_id": "not a non-negative integer",
    "dwell": "not a non-negative number",
}


@dataclass(frozen=True)
class ImportSpec:
    """What to import and how.

    Args:
        path: a file, or a directory whose files of ``format`` (by suffix, see
            :data:`FORMAT_SUFFIXES`) are read in sorted order, recursively.
        format: ``csv`` (a header row is required) or ``parquet``.
        columns: target -> source column. Targets: ``user_id``, ``item_id``, ``timestamp``
            (required); ``label`` (alias of ``like``), ``view``, ``like``, ``comment``, ``share``,
            ``hide``, ``dwell`` (optional).
        out_dir: the world directory to write, e.g. ``RUN_DIR/world``.
        thresholds: binary target (or ``label``) -> value at or above which the label is 1.
            Targets not listed use 1.0 (so 0/1 and boolean columns work as they are).
        timestamp_unit: unit of numeric timestamps since the Unix epoch.
        day_seconds: length of one day of the layout, in seconds (coarser days shrink the
            per-day feature tables of long logs).
        delimiter: CSV field delimiter (one character).
        skip_bad_rows: quarantine bad rows (see :func:`quarantine_path`) instead of failing.
        overwrite: replace an existing world in ``out_dir``.
        max_days: refuse logs spanning more days (the preprocess tables grow with days x
            entities; a wrong ``timestamp_unit`` is the usual cause).

    Example::

        ImportSpec(
            path=Path("ratings.csv"),
            format="csv",
            columns={"user_id": "userId", "item_id": "movieId", "timestamp": "timestamp",
                     "label": "rating"},
            out_dir=Path("runs/ml/world"),
            thresholds={"label": 4.0},
        )
    """

    path: Path
    format: Format
    columns: Mapping[str, str]
    out_dir: Path
    thresholds: Mapping[str, float] = field(default_factory=dict)
    timestamp_unit: TimestampUnit = "s"
    day_seconds: float = 86_400.0
    delimiter: str = ","
    skip_bad_rows: bool = False
    overwrite: bool = False
    max_days: int = 3660

    def __post_init__(self) -> None:
        if self.format not in FORMAT_SUFFIXES:
            raise ValueError(f"import spec: format must be one of {sorted(FORMAT_SUFFIXES)}")
        unknown = sorted(set(self.columns) - set(TARGETS))
        if unknown:
            raise ValueError(f"import spec: unknown target(s) {unknown}; expected {TARGETS}")
        missing = [t for t in REQUIRED_TARGETS if t not in self.columns]
        if missing:
            raise ValueError(f"import spec: map a source column to {missing}")
        empty = sorted(t for t, c in self.columns.items() if not c)
        if empty:
            raise ValueError(f"import spec: empty source column name for {empty}")
        if LABEL_ALIAS in self.columns and "like" in self.columns:
            raise ValueError("import spec: map either label or like (label is an alias of like)")
        for target, value in self.thresholds.items():
            if target not in self.columns or target not in (LABEL_ALIAS, *BINARY_LABELS):
                raise ValueError(
                    f"import spec: threshold for {target!r}, which is not a mapped binary label"
                )
            if not math.isfinite(value):
                raise ValueError(f"import spec: threshold for {target!r} must be finite")
        if self.timestamp_unit not in UNIT_SECONDS:
            raise ValueError(f"import spec: timestamp_unit must be one of {sorted(UNIT_SECONDS)}")
        if not (math.isfinite(self.day_seconds) and self.day_seconds > 0):
            raise ValueError("import spec: day_seconds must be > 0")
        if len(self.delimiter) != 1 or self.delimiter in '\r\n"':
            raise ValueError("import spec: delimiter must be one character (not a quote/newline)")
        if self.max_days < MIN_DAYS:
            raise ValueError(f"import spec: max_days must be >= {MIN_DAYS}")

    @property
    def label_columns(self) -> dict[str, str]:
        """Registry label -> source column (``label`` resolved to ``like``)."""
        out = {t: c for t, c in self.columns.items() if t in LABELS}
        if LABEL_ALIAS in self.columns:
            out["like"] = self.columns[LABEL_ALIAS]
        return out

    @property
    def label_thresholds(self) -> dict[str, float]:
        """Binary registry label -> threshold, for every mapped binary label."""
        named = {("like" if t == LABEL_ALIAS else t): v for t, v in self.thresholds.items()}
        return {t: float(named.get(t, 1.0)) for t in self.label_columns if t in BINARY_LABELS}

    @property
    def implicit_feedback(self) -> bool:
        """Neither ``label`` nor ``like`` is mapped: every interaction counts as a like."""
        return "like" not in self.label_columns


@dataclass(frozen=True)
class ColumnProblem:
    """Rows of one source column that cannot be imported (or a column that is missing).

    Args:
        column: the source column (``"(row)"`` for CSV lines that do not parse at all).
        target: what it is mapped to.
        reason: what is wrong with the values.
        bad_rows: how many rows (0 when the column is missing altogether).
        first_rows: the first few, e.g. ``"line 7"`` (CSV) or ``"part-1.parquet row 3"``.
        values: their offending values, as text.
    """

    column: str
    target: str
    reason: str
    bad_rows: int = 0
    first_rows: tuple[str, ...] = ()
    values: tuple[str, ...] = ()

    def describe(self) -> str:
        head = f"column {self.column!r} ({self.target}): {self.reason}"
        if not self.bad_rows:
            return head
        more = ", ..." if self.bad_rows > len(self.first_rows) else ""
        shown = ", ".join(self.first_rows) + more
        values = ", ".join(self.values)
        return f"{head}: {self.bad_rows} bad row(s): {shown} (values: {values})"


class LogImportError(ValueError):
    """The logs cannot be imported as they are. ``problems`` names every bad column."""

    def __init__(self, message: str, problems: Sequence[ColumnProblem] = ()) -> None:
        self.problems = tuple(problems)
        lines = [message, *[f"  {p.describe()}" for p in self.problems]]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class LogImport:
    """What :func:`import_logs` wrote (also saved as ``source.json`` in the world).

    Args:
        world: the layout written (no ``truth/``).
        files: the source files read, in order.
        rows_read: data rows in the source files (blank lines excluded).
        rows: interactions imported.
        bad_rows: rows set aside (only with ``skip_bad_rows``), stored in ``quarantine``.
        blank_lines: CSV lines with only empty fields (dropped: they hold no data).
        quarantine: Parquet file of the bad rows, or None when there were none.
        n_users, n_items, n_days: sizes of the imported world.
        empty_days: days without any interaction (no partition written).
        day_origin: Unix seconds at which day 0 starts.
        day_seconds: length of a day in seconds.
        label_columns: registry label -> source column.
        label_thresholds: binary registry label -> threshold applied.
        implicit_feedback: no like/label column, every interaction counted as a like.
    """

    world: WorldLayout
    files: tuple[Path, ...]
    rows_read: int
    rows: int
    bad_rows: int
    blank_lines: int
    quarantine: Path | None
    n_users: int
    n_items: int
    n_days: int
    empty_days: tuple[int, ...]
    day_origin: float
    day_seconds: float
    label_columns: dict[str, str]
    label_thresholds: dict[str, float]
    implicit_feedback: bool

    def __post_init__(self) -> None:
        if self.rows < 1 or self.rows + self.bad_rows != self.rows_read:
            raise ValueError("log import: rows + bad_rows must equal rows_read (>= 1 row)")
        if self.bad_rows and self.quarantine is None:
            raise ValueError("log import: bad rows need a quarantine file")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["world"] = str(self.world.root)
        out["files"] = [str(f) for f in self.files]
        out["quarantine"] = str(self.quarantine) if self.quarantine else None
        out["empty_days"] = list(self.empty_days)
        return out

    def summary(self) -> str:
        feedback = (
            "implicit (every interaction is a like)"
            if self.implicit_feedback
            else ", ".join(
                f"{t}={c}"
                + (f">={self.label_thresholds[t]:g}" if t in self.label_thresholds else "")
                for t, c in self.label_columns.items()
            )
        )
        lines = [
            f"imported {self.rows:,} interactions ({self.n_users:,} users, {self.n_items:,} "
            f"items, {self.n_days} days) into {self.world.root}",
            f"labels: {feedback}",
        ]
        if self.bad_rows:
            lines.append(f"quarantined {self.bad_rows:,} bad row(s) in {self.quarantine}")
        if self.empty_days:
            lines.append(f"{len(self.empty_days)} day(s) without interactions")
        return "\n".join(lines)


def quarantine_path(out_dir: Path) -> Path:
    """Where ``skip_bad_rows`` puts the bad rows: ``<out>.quarantine.parquet`` next to ``out``."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".quarantine.parquet")


# ---------------------------------------------------------------------------------------------
# Reading and parsing
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FileRows:
    """One source file, read and parsed. Arrays have one entry per data row of the file.

    ``positions`` are CSV line numbers (header = 1) or 1-based Parquet row numbers; ``values`` are
    parsed per target (meaningless where ``bad`` is set); ``malformed`` lists CSV lines that do
    not split into the header's fields, as (line number or -1, text, problem).
    """

    path: Path
    table: pa.Table
    positions: np.ndarray
    values: dict[str, np.ndarray]
    bad: dict[str, np.ndarray]
    malformed: tuple[tuple[int, str, str], ...]
    blank_lines: int
    position_name: Literal["line", "row"]

    @property
    def any_bad(self) -> np.ndarray:
        bad = np.zeros(self.table.num_rows, dtype=bool)
        for mask in self.bad.values():
            bad |= mask
        return bad

    def where(self, row: int) -> str:
        return f"{self.position_name} {int(self.positions[row])}"


def input_files(path: Path, fmt: Format) -> list[Path]:
    """The files an import of ``path`` reads: the file itself, or a directory's files of
    ``fmt`` (recursively, sorted)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_file():
        return [path]
    suffixes = FORMAT_SUFFIXES[fmt]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"no {fmt} files ({', '.join(suffixes)}) under {path}")
    return files


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with pa.input_stream(str(path), compression="detect") as stream:
        head = stream.read(1 << 20)
    first = head.split(b"\n", 1)[0].decode("utf-8-sig").rstrip("\r")
    return next(csv.reader([first], delimiter=delimiter), [])


def _read_csv(
    path: Path, delimiter: str
) -> tuple[pa.Table, np.ndarray, list[tuple[int, str, str]]]:
    """Every column as text. Returns (table, line number of each row, malformed lines)."""
    names = _csv_header(path, delimiter)
    malformed: list[tuple[int, str, str]] = []

    def on_invalid(row: Any) -> str:
        problem = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        malformed.append((row.number if row.number is not None else -1, row.text, problem))
        return "skip"

    table = pacsv.read_csv(
        path,
        # single-threaded: the only mode in which pyarrow knows the line of a malformed row
        read_options=pacsv.ReadOptions(use_threads=False),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter, invalid_row_handler=on_invalid, ignore_empty_lines=False
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names}, strings_can_be_null=False
        ),
    )
    # Without multi-line values every line after the header is a row or a malformed line.
    skipped = np.array(sorted(m[0] for m in malformed if m[0] > 0), dtype=np.int64)
    lines = np.arange(2, 2 + table.num_rows + len(skipped), dtype=np.int64)
    return table, lines[~np.isin(lines, skipped)], malformed


def _decoded(col: pa.ChunkedArray) -> pa.Array:
    arr = col.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return arr


def _valid(arr: pa.Array) -> np.ndarray:
    return np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), dtype=bool)


def _floats(arr: pa.Array) -> np.ndarray:
    """float64 [N]; NaN where null."""
    return np.asarray(pc.fill_null(arr.cast(pa.float64()), np.nan).to_numpy(), dtype=np.float64)


def _numeric_strings(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Text -> (float64 [N], bool [N] parsed)."""
    ok = np.asarray(
        pc.fill_null(pc.match_substring_regex(arr, _NUMBER_PATTERN), False).to_numpy(
            zero_copy_only=False
        ),
        dtype=bool,
    )
    text = pc.utf8_trim_whitespace(pc.if_else(pa.array(ok), arr, "0"))
    return np.array(text.cast(pa.float64()).to_numpy(), dtype=np.float64), ok


def parse_ids(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Source ids -> (int64 [N] ids, bool [N] bad). Good: non-negative integers (text or numbers;
    ``"12.0"`` and integral floats count)."""
    arr = _decoded(col)
    n = len(arr)
    if pa.types.is_string(arr.type):
        ok = np.asarray(
            pc.fill_null(pc.match_substring_regex(arr, _ID_PATTERN), False).to_numpy(
                zero_copy_only=False
            ),
            dtype=bool,
        )
        digits = pc.extract_regex(pc.if_else(pa.array(ok), arr, "0"), _ID_PATTERN).field("id")
        return np.asarray(digits.cast(pa.int64()).to_numpy(), dtype=np.int64), ~ok
    if pa.types.is_integer(arr.type):
        valid = _valid(arr)
        if pa.types.is_unsigned_integer(arr.type):
            raw = pc.fill_null(arr, 0).to_numpy()
            ok = valid & (raw <= np.iinfo(np.int64).max)
            return np.where(ok, raw, 0).astype(np.int64), ~ok
        ids = np.asarray(pc.fill_null(arr, 0).cast(pa.int64()).to_numpy(), dtype=np.int64)
        ok = valid & (ids >= 0)
        return np.where(ok, ids, 0), ~ok
    if pa.types.is_floating(arr.type):
        x = _floats(arr)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(x) & (x >= 0) & (x < 2.0**53) & (np.floor(x) == x)
        return np.where(ok, x, 0).astype(np.int64), ~ok
    return np.zeros(n, np.int64), np.ones(n, dtype=bool)


def parse_timestamps(col: pa.ChunkedArray, unit: TimestampUnit) -> tuple[np.ndarray, np.ndarray]:
    """Source timestamps -> (float64 [N] Unix seconds, bool [N] bad).

    Numbers (and numeric text) are ``unit`` since the epoch; other text must be ISO 8601 (a
    timezone-less one is UTC); Arrow timestamps and dates are taken as they are.
    """
    arr = _decoded(col)
    n = len(arr)
    if pa.types.is_date(arr.type):
        arr = arr.cast(pa.timestamp("s"))
    if pa.types.is_timestamp(arr.type):
        per_unit = UNIT_SECONDS[arr.type.unit]
        valid = _valid(arr)
        raw = np.asarray(pc.fill_null(arr.cast(pa.int64()), 0).to_numpy(), dtype=np.float64)
        return raw * per_unit, ~valid
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        x = _floats(arr) * UNIT_SECONDS[unit]
        return x, ~np.isfinite(x)
    if pa.types.is_string(arr.type):
        number, is_number = _numeric_strings(arr)
        seconds = number * UNIT_SECONDS[unit]
        rest = np.flatnonzero(~is_number)
        if len(rest):
            text = pd.Series(arr.take(pa.array(rest)).to_pylist(), dtype=object)
            when = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
            epoch = pd.Timestamp("1970-01-01", tz="UTC")
            seconds[rest] = (when - epoch).dt.total_seconds().to_numpy(dtype=np.float64)
        return seconds, ~np.isfinite(seconds)
    return np.zeros(n), np.ones(n, dtype=bool)


def parse_numbers(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Feedback values -> (float64 [N], bool [N] bad). Numbers, booleans, numeric text or
    ``true``/``false``."""
    arr = _decoded(col)
    n = len(arr)
    if pa.types.is_boolean(arr.type) or pa.types.is_integer(arr.type):
        x = _floats(arr)
        return x, ~np.isfinite(x)
    if pa.types.is_floating(arr.type):
        x = _floats(arr)
        return x, ~np.isfinite(x)
    if pa.types.is_string(arr.type):
        x, ok = _numeric_strings(arr)
        lower = pc.utf8_lower(pc.utf8_trim_whitespace(arr))
        for word, value in (("true", 1.0), ("false", 0.0)):
            hit = np.asarray(
                pc.fill_null(pc.equal(lower, word), False).to_numpy(zero_copy_only=False),
                dtype=bool,
            )
            x[hit], ok = value, ok | hit
        return x, ~(ok & np.isfinite(x))
    return np.zeros(n), np.ones(n, dtype=bool)


def _timestamp_reason(unit: str) -> str:
    return f"not a number ({unit} since the Unix epoch) or an ISO 8601 date-time"


def _read_file(path: Path, spec: ImportSpec) -> _FileRows:
    malformed: list[tuple[int, str, str]] = []
    blank_lines = 0
    try:
        if spec.format == "csv":
            table, positions, malformed = _read_csv(path, spec.delimiter)
        else:
            table = pq.read_table(path)
            positions = np.arange(1, table.num_rows + 1, dtype=np.int64)
    except (pa.ArrowInvalid, OSError) as e:
        raise LogImportError(f"cannot read {path} as {spec.format}: {e}") from e
    if spec.format == "csv" and table.num_rows and table.num_columns:
        blank = np.logical_and.reduce(
            [
                np.asarray(pc.equal(c, "").to_numpy(zero_copy_only=False), dtype=bool)
                for c in table.columns
            ]
        )
        blank_lines = int(blank.sum())
        if blank_lines:
            table = table.filter(pa.array(~blank))
            positions = positions[~blank]

    missing = [
        ColumnProblem(
            column, target, f"missing from {path} (columns: {', '.join(table.column_names)})"
        )
        for target, column in spec.columns.items()
        if column not in table.column_names
    ]
    if missing:
        raise LogImportError(f"cannot import {path}: mapped column(s) not found", missing)

    values: dict[str, np.ndarray] = {}
    bad: dict[str, np.ndarray] = {}
    for target, column in spec.columns.items():
        col = table.column(column)
        if target in ("user_id", "item_id"):
            values[target], bad[target] = parse_ids(col)
        elif target == "timestamp":
            values[target], bad[target] = parse_timestamps(col, spec.timestamp_unit)
        else:
            x, b = parse_numbers(col)
            if target == "dwell":
                with np.errstate(invalid="ignore"):
                    b |= x < 0
            values[target], bad[target] = x, b
    position_name: Literal["line", "row"] = "line" if spec.format == "csv" else "row"
    return _FileRows(
        path, table, positions, values, bad, tuple(malformed), blank_lines, position_name
    )


def _as_text(col: pa.ChunkedArray) -> pa.Array:
    arr = _decoded(col)
    try:
        return arr.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.array([None if v is None else str(v) for v in arr.to_pylist()], pa.string())


def _problems(files: Sequence[_FileRows], spec: ImportSpec) -> list[ColumnProblem]:
    """One problem per bad column (and one for malformed CSV lines), across all files."""
    many = len(files) > 1
    out: list[ColumnProblem] = []
    lines = [(f, m) for f in files for m in f.malformed]
    if lines:
        out.append(
            ColumnProblem(
                column="(row)",
                target="all",
                reason="malformed line (wrong number of fields)",
                bad_rows=len(lines),
                first_rows=tuple(
                    (f"{f.path.name} " if many else "") + f"line {m[0]}"
                    for f, m in lines[:SHOWN_ROWS]
                ),
                values=tuple(repr(m[1][:60]) for _, m in lines[:SHOWN_ROWS]),
            )
        )
    for target, column in spec.columns.items():
        total = sum(int(f.bad[target].sum()) for f in files)
        if not total:
            continue
        shown: list[str] = []
        values: list[str] = []
        for f in files:
            rows = np.flatnonzero(f.bad[target])[: SHOWN_ROWS - len(shown)]
            if not len(rows):
                continue
            shown += [(f"{f.path.name} " if many else "") + f.where(int(r)) for r in rows]
            texts = _as_text(f.table.column(column)).take(pa.array(rows)).to_pylist()
            values += [repr(t) for t in texts]
            if len(shown) >= SHOWN_ROWS:
                break
        reason = _REASONS.get(target, "not a number")
        if target == "timestamp":
            reason = _timestamp_reason(spec.timestamp_unit)
        out.append(ColumnProblem(column, target, reason, total, tuple(shown), tuple(values)))
    return out


def _write_quarantine(files: Sequence[_FileRows], spec: ImportSpec, path: Path) -> int:
    """Every bad row (all its source columns as text) with where it came from and why."""
    parts: list[pa.Table] = []
    for f in files:
        rows = np.flatnonzero(f.any_bad)
        if len(rows):
            bad = f.table.take(pa.array(rows))
            cols = {name: _as_text(bad.column(name)) for name in bad.column_names}
            why = [
                "; ".join(
                    f"{spec.columns[t]} ({t}): "
                    + (
                        _timestamp_reason(spec.timestamp_unit)
                        if t == "timestamp"
                        else _REASONS.get(t, "not a number")
                    )
                    for t in spec.columns
                    if f.bad[t][r]
                )
                for r in rows
            ]
            cols["_source_file"] = pa.array([str(f.path)] * len(rows), pa.string())
            cols["_source_row"] = pa.array(f.positions[rows], pa.int64())
            cols["_problems"] = pa.array(why, pa.string())
            parts.append(pa.table(cols))
        if f.malformed:
            parts.append(
                pa.table(
                    {
                        "_source_file": pa.array([str(f.path)] * len(f.malformed), pa.string()),
                        "_source_row": pa.array([m[0] for m in f.malformed], pa.int64()),
                        "_problems": pa.array([m[2] for m in f.malformed], pa.string()),
                        "_raw_line": pa.array([m[1] for m in f.malformed], pa.string()),
                    }
                )
            )
    table = pa.concat_tables(parts, promote_options="permissive")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return table.num_rows


# ---------------------------------------------------------------------------------------------
# Writing the world
# ---------------------------------------------------------------------------------------------


def _clear(layout: WorldLayout, overwrite: bool) -> None:
    """Make room for the world; only ever removes what a world consists of."""
    existing = [
        p
        for p in (layout.logs, layout.entities, layout.truth, layout.config, layout.source)
        if p.exists()
    ]
    if existing and not overwrite:
        raise FileExistsError(f"{layout.root} already holds a world; pass overwrite (--overwrite)")
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


@dataclass(frozen=True)
class _Interactions:
    """The valid rows in time order (ties keep the source order), ids renumbered.

    Shapes [N]: ts (days since the start of day 0), day, user, item; ``labels`` holds every
    registry label (binary ones int8, dwell float32). source_users [U], source_items [I]: the
    source id of each new id.
    """

    ts: np.ndarray
    day: np.ndarray
    user: np.ndarray
    item: np.ndarray
    labels: dict[str, np.ndarray]
    source_users: np.ndarray
    source_items: np.ndarray
    origin: float

    @property
    def n_days(self) -> int:
        return int(self.day[-1]) + 1

    @classmethod
    def collect(cls, files: Sequence[_FileRows], spec: ImportSpec) -> _Interactions:
        keep = [~f.any_bad for f in files]

        def good(target: str) -> np.ndarray:
            return np.concatenate([f.values[target][k] for f, k in zip(files, keep, strict=True)])

        if sum(int(k.sum()) for k in keep) == 0:
            raise LogImportError(f"cannot import {spec.path}: no valid interaction rows")
        seconds = good("timestamp")
        origin = math.floor(float(seconds.min()) / spec.day_seconds) * spec.day_seconds
        order = np.argsort(seconds, kind="stable")
        ts = (seconds[order] - origin) / spec.day_seconds
        source_users, user = np.unique(good("user_id")[order], return_inverse=True)
        source_items, item = np.unique(good("item_id")[order], return_inverse=True)
        n = len(ts)
        labels = {t: np.zeros(n, np.int8) for t in BINARY_LABELS}
        labels["view"][:] = 1
        if spec.implicit_feedback:
            labels["like"][:] = 1
        labels["dwell"] = np.zeros(n, np.float32)
        thresholds = spec.label_thresholds
        source_of = {"like": LABEL_ALIAS} if LABEL_ALIAS in spec.columns else {}
        for target in spec.label_columns:
            value = good(source_of.get(target, target))[order]
            if target == "dwell":
                labels[target] = value.astype(np.float32)
            else:
                labels[target] = (value >= thresholds[target]).astype(np.int8)
        return cls(
            ts=ts,
            day=np.floor(ts).astype(np.int64),
            user=user.astype(np.int64),
            item=item.astype(np.int64),
            labels=labels,
            source_users=source_users.astype(np.int64),
            source_items=source_items.astype(np.int64),
            origin=float(origin),
        )

    def write_logs(self, layout: WorldLayout) -> tuple[int, ...]:
        """``logs/day=D/part-0.parquet`` per day with interactions; returns the empty days."""
        n = len(self.ts)
        logs: dict[str, np.ndarray] = {
            "impression_id": np.arange(n, dtype=np.int64),
            "ts": self.ts.astype(np.float64),
            "user_id": self.user,
            "post_id": self.item,
            "position": np.zeros(n, np.int64),
            "propensity": np.ones(n, np.float32),
            **self.labels,
        }
        bounds = np.searchsorted(self.day, np.arange(self.n_days + 1))
        empty = []
        for d in range(self.n_days):
            lo, hi = int(bounds[d]), int(bounds[d + 1])
            if lo == hi:
                empty.append(d)
                continue
            part = {name: logs[name][lo:hi] for name in LOG_SCHEMA.names}
            write_table(layout.log_day(d) / "part-0.parquet", part, LOG_SCHEMA)
        return tuple(empty)

    def write_entities(self, layout: WorldLayout) -> WorldConfig:
        """Users, items (with unknown attributes), one creator, no follows; returns the config."""
        n_users, n_items = len(self.source_users), len(self.source_items)
        _, first_of_user = np.unique(self.user, return_index=True)
        _, first_of_item = np.unique(self.item, return_index=True)
        write_table(
            layout.users,
            {
                "user_id": np.arange(n_users, dtype=np.int64),
                "user_segment": np.full(n_users, UNKNOWN, np.int64),
                "signup_day": self.day[first_of_user],
                "source_user_id": self.source_users,
            },
        )
        write_table(
            layout.posts,
            {
                "post_id": np.arange(n_items, dtype=np.int64),
                "creator_id": np.full(n_items, UNKNOWN, np.int64),
                "topic": np.full(n_items, UNKNOWN, np.int64),
                "media_type": np.full(n_items, UNKNOWN, np.int64),
                "created_at": self.ts[first_of_item].astype(np.float64),
                "content_emb": np.zeros((n_items, CONTENT_DIM), np.float32),
                "source_item_id": self.source_items,
            },
        )
        write_table(
            layout.creators,
            {"creator_id": np.array([UNKNOWN], np.int64), "followers": np.zeros(1, np.float32)},
        )
        write_table(
            layout.follows, {"user_id": np.zeros(0, np.int64), "creator_id": np.zeros(0, np.int64)}
        )
        return WorldConfig(
            n_users=n_users,
            n_creators=1,
            n_posts=n_items,
            n_days=self.n_days,
            impressions_per_day=max(1, math.ceil(len(self.ts) / self.n_days)),
            n_topics=1,
            session_len=1,
            pool_size=1,
            post_lifetime_days=float(self.n_days + 1),  # items never expire within the log
            new_user_frac=0.0,
            follows_per_user=0.0,
        )


def import_logs(spec: ImportSpec) -> LogImport:
    """Validate the logs of ``spec``, then write them as a world to ``spec.out_dir``.

    Raises:
        LogImportError: mapped columns missing, bad rows (without ``skip_bad_rows``), nothing
            left to import, or a time span outside 4..``max_days`` days. Nothing is written then.
        FileExistsError: ``out_dir`` holds a world and ``overwrite`` is off.
    """
    files = input_files(Path(spec.path), spec.format)
    parsed = [_read_file(f, spec) for f in files]
    problems = _problems(parsed, spec)
    if problems and not spec.skip_bad_rows:
        raise LogImportError(
            f"cannot import {spec.path}: {len(problems)} problem(s) (CSV rows are line "
            "numbers, header = line 1; Parquet rows are 1-based); fix them or pass "
            "--skip-bad-rows to quarantine them",
            problems,
        )
    rows = _Interactions.collect(parsed, spec)
    if not MIN_DAYS <= rows.n_days <= spec.max_days:
        first, last = (
            pd.Timestamp(rows.origin + t * spec.day_seconds, unit="s", tz="UTC").isoformat()
            for t in (rows.ts[0], rows.ts[-1])
        )
        raise LogImportError(
            f"cannot import {spec.path}: the timestamps ({first} .. {last}) span {rows.n_days} "
            f"day(s) of {spec.day_seconds:g} s; the layout needs {MIN_DAYS}..{spec.max_days} "
            f"days. Check the timestamp unit ({spec.timestamp_unit}), outliers, or choose "
            "another day length"
        )

    layout = WorldLayout(Path(spec.out_dir))
    _clear(layout, spec.overwrite)
    quarantine = quarantine_path(layout.root)
    quarantine.unlink(missing_ok=True)
    bad_rows = _write_quarantine(parsed, spec, quarantine) if problems else 0
    empty_days = rows.write_logs(layout)
    world_cfg = rows.write_entities(layout)
    layout.config.write_text(json.dumps(world_cfg.to_dict(), indent=2))
    result = LogImport(
        world=layout,
        files=tuple(files),
        rows_read=sum(f.table.num_rows + len(f.malformed) for f in parsed),
        rows=len(rows.ts),
        bad_rows=bad_rows,
        blank_lines=sum(f.blank_lines for f in parsed),
        quarantine=quarantine if bad_rows else None,
        n_users=world_cfg.n_users,
        n_items=world_cfg.n_posts,
        n_days=world_cfg.n_days,
        empty_days=empty_days,
        day_origin=rows.origin,
        day_seconds=float(spec.day_seconds),
        label_columns=spec.label_columns,
        label_thresholds=spec.label_thresholds,
        implicit_feedback=spec.implicit_feedback,
    )
    spec_info = {
        "path": str(spec.path),
        "format": spec.format,
        "columns": dict(spec.columns),
        "thresholds": dict(spec.thresholds),
        "timestamp_unit": spec.timestamp_unit,
        "delimiter": spec.delimiter,
    }
    source = {"kind": "imported_logs", "spec": spec_info, **result.to_dict()}
    layout.source.write_text(json.dumps(source, indent=2))
    return result
