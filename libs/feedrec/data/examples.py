"""Arrow <-> ``dict[str, np.ndarray]`` for examples, with the schema derived from the registry."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from feedrec.schema.registry import example_arrow_schema

EXAMPLE_SCHEMA = example_arrow_schema()


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
