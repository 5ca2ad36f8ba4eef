"""Log ingestion under bad input: replayed, late, malformed and mis-typed rows and broken files
are quarantined with their reason by the preprocess job; nothing else changes and nothing is
lost; a re-run gives the same result."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from feedrec import pipeline
from feedrec.data import PreprocessLayout
from feedrec.runtime import RunLayout


def _examples(data: PreprocessLayout) -> pa.Table:
    parts = [pq.read_table(data.examples(s)) for s in ("train", "valid", "test")]
    return pa.concat_tables(parts).sort_by("impression_id")


def test_bad_log_rows_are_quarantined_with_their_reason_and_reruns_are_idempotent(
    debug_run: Path, tmp_path: Path
) -> None:
    source = RunLayout(debug_run)
    clean = PreprocessLayout(source.data)
    assert clean.read_meta()["validation"]["quarantined"] == {}  # generated logs are valid
    run = RunLayout(tmp_path / "run")
    shutil.copytree(source.world, run.world)
    logs = run.world / "logs"
    day1 = pq.read_table(logs / "day=1" / "part-0.parquet", partitioning=None)
    day2 = pq.read_table(logs / "day=2" / "part-0.parquet", partitioning=None)
    fresh = 10**9  # impression ids no generated row has

    # A delivery replayed 50 rows of the last day (one of them twice), then 5 new rows (on the
    # last day they change no other row's features: features only look at earlier days).
    day5 = pq.read_table(logs / "day=5" / "part-0.parquet", partitioning=None)
    new = day5.slice(200, 5).set_column(0, "impression_id", pa.array(fresh + 200 + np.arange(5)))
    replay = pa.concat_tables([day5.slice(0, 50), day5.slice(7, 1), new])
    pq.write_table(replay, logs / "day=5" / "replayed.parquet")
    # 10 day-1 events that arrived after day 1 was cut, filed under day 2.
    late = day1.slice(100, 10).set_column(0, "impression_id", pa.array(fresh + np.arange(10)))
    pq.write_table(late, logs / "day=2" / "late.parquet")
    # One row per row problem, each otherwise a valid new impression of day 2.
    base = day2.slice(0, 1)

    def broken(i: int, column: str, value: object) -> pa.Table:
        row = base.set_column(0, "impression_id", pa.array([fresh + 100 + i]))
        index = row.schema.get_field_index(column)
        return row.set_column(index, row.schema.field(column), pa.array([value], row[column].type))

    bad = [
        broken(0, "ts", None),
        broken(1, "user_id", 10**7),
        broken(2, "post_id", -3),
        broken(3, "position", -1),
        broken(4, "like", 2),
        broken(5, "dwell", float("nan")),
        broken(6, "propensity", 0.0),
        broken(7, "ts", 3.5),
    ]
    pq.write_table(pa.concat_tables(bad), logs / "day=2" / "malformed.parquet")
    # Whole files: an old writer without dwell, a writer with text ids, not Parquet at all.
    pq.write_table(day2.slice(0, 5).drop_columns(["dwell"]), logs / "day=3" / "old.parquet")
    typo = day2.slice(5, 4).set_column(
        2, "user_id", pa.array(["u1", "u2", "u3", "u4"], pa.string())
    )
    pq.write_table(typo, logs / "day=3" / "typo.parquet")
    (logs / "day=3" / "garbage.parquet").write_text("not parquet")
    before = {p: p.read_bytes() for p in logs.rglob("*.parquet")}

    report = pipeline.preprocess(run)
    print("\n" + report)
    data = PreprocessLayout(run.data)
    meta = data.read_meta()
    validation = meta["validation"]
    quarantined = dict(validation["quarantined"])
    wrong_type = [k for k in quarantined if k.startswith("wrong column type")]
    assert len(wrong_type) == 1 and quarantined.pop(wrong_type[0]) == 4, quarantined
    assert quarantined == {
        "duplicate impression_id": 51,
        "late: ts before its day": 10,
        "null value": 1,
        "user_id unknown": 1,
        "post_id unknown": 1,
        "negative position": 1,
        "label not 0 or 1": 1,
        "bad dwell": 1,
        "propensity not in (0, 1]": 1,
        "misfiled: ts after its day": 1,
        "missing column(s) ['dwell']": 5,
    }, quarantined
    assert list(validation["unreadable"]) == [str(logs / "day=3" / "garbage.parquet")]
    total = sum(pq.ParquetFile(p).metadata.num_rows for p in before if p.name != "garbage.parquet")
    assert validation["rows"] == total and validation["kept"] == 6 * 4000 + 5
    assert sum(meta["rows"].values()) == 6 * 4000 + 5  # the generated rows and the 5 new ones
    # The examples are those of the clean world, row for row, plus the 5 new rows (read from
    # the cleaned copy of the replayed file).
    examples = _examples(data)
    ids = examples.column("impression_id").to_numpy()
    assert examples.filter(pa.array(ids < fresh)).equals(_examples(clean))
    added = examples.filter(pa.array(ids >= fresh))
    assert added.column("impression_id").to_pylist() == list(fresh + 200 + np.arange(5))
    assert set(added.column("day").to_pylist()) == {5}

    quarantine = pads.dataset(run.data / "quarantine", partitioning="hive").to_table()
    assert quarantine.num_rows == sum(validation["quarantined"].values())
    rows = quarantine.to_pandas()
    dup = rows[rows["_reason"] == "duplicate impression_id"]
    assert set(dup["_source_file"].map(lambda p: Path(p).name)) == {"replayed.parquet"}
    assert sorted(dup["_source_row"]) == list(range(51))
    typo_rows = rows[rows["_source_file"].str.endswith("typo.parquet")]
    assert sorted(typo_rows["user_id"]) == ["u1", "u2", "u3", "u4"]  # kept as they came
    assert {p: p.read_bytes() for p in logs.rglob("*.parquet")} == before  # inputs untouched

    again = pipeline.preprocess(run)
    assert data.read_meta()["validation"] == validation
    assert _examples(data).equals(examples)
    again_q = pads.dataset(run.data / "quarantine", partitioning="hive").to_table()
    assert again_q.num_rows == quarantine.num_rows
    assert again.splitlines()[-1] == report.splitlines()[-1]
