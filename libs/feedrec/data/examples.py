"""Arrow <-> ``dict[str, np.ndarray]`` for examples, with the schema derived from the registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feedrec.schema.registry import example_arrow_schema

EXAMPLE_SCHEMA = example_arrow_schema()

#: A Ray Data style batch: column name -> array with the rows on axis 0.
Columns = dict[str, np.ndarray]


def arrow_from_columns(columns: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Build a table with ``schema``; 2-d arrays become fixed-size lists."""
    arrays = []
    for field in schema:
        col = np.asarray(columns[field.name])
        if pa.types.is_fixed_size_list(field.type):
            flat = pa.array(col.reshape(-1), type=field.type.value_type)
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, field.type.list_size))
        else:
            arrays.append(pa.array(col, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def columns_from_arrow(table: pa.Table) -> dict[str, np.ndarray]:
    """Numpy columns; fixed-size lists become 2-d arrays [N, size]."""
    out: dict[str, np.ndarray] = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        arr = col.combine_chunks()
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
            out[name] = arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
        else:
            out[name] = arr.to_numpy(zero_copy_only=False)
    return out


def iter_column_batches(
    path: Path,
    to_columns: Callable[[pa.Table], Columns],
    batch_size: int,
    *,
    seed: int,
    shuffle_buffer: int = 0,
    drop_last: bool = True,
) -> Iterator[Columns]:
    """Stream a parquet dataset as transformed column batches.

    Files in a seeded random order; rows shuffled within a buffer of ``shuffle_buffer`` rows
    (0 = no shuffle). Memory stays O(buffer + batch), never the whole dataset.
    """
    rng = np.random.default_rng(seed)
    files = sorted(Path(path).rglob("*.parquet"))
    pending: list[Columns] = []
    pending_rows = 0
    target = max(shuffle_buffer, batch_size)

    def emit(final: bool) -> Iterator[Columns]:
        nonlocal pending, pending_rows
        cols = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
        order = rng.permutation(pending_rows) if shuffle_buffer else np.arange(pending_rows)
        n_full = pending_rows // batch_size
        for i in range(n_full):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield {k: v[idx] for k, v in cols.items()}
        rest = order[n_full * batch_size :]
        pending, pending_rows = [], 0
        if len(rest):
            if final and not drop_last:
                yield {k: v[rest] for k, v in cols.items()}
            elif not final:
                pending, pending_rows = [{k: v[rest] for k, v in cols.items()}], len(rest)

    for file in (files[i] for i in rng.permutation(len(files))):
        for record_batch in pq.ParquetFile(file).iter_batches(batch_size=8192):
            cols = to_columns(pa.Table.from_batches([record_batch]))
            pending.append(cols)
            pending_rows += len(next(iter(cols.values())))
            if pending_rows >= target:
                yield from emit(final=False)
    if pending_rows:
        yield from emit(final=True)
