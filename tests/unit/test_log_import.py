"""Bring-your-own logs (no Ray): validation messages, CSV/Parquet round trips, the ratio split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from feedrec.cli import main
from feedrec.data.log_import import (
    LOG_SCHEMA,
    ImportSpec,
    LogImportError,
    import_logs,
    quarantine_path,
)
from feedrec.data.preprocess import SPLITS, PreprocessConfig, random_split
from feedrec.world import WorldConfig, WorldLayout, generate_world
from feedrec.world.generator import load_world_config

DAY = 86_400
T0 = 978_307_200  # 2001-01-01T00:00:00Z
REQUIRED = ("user_id", "item_id", "timestamp")
MAPPING = {"user_id": "userId", "item_id": "movieId", "timestamp": "ts", "label": "rating"}
# 5 interactions over days 0, 1, 3 and 4 (none on day 2); user 30 is first seen on day 3.
GOOD_CSV = (
    "userId,movieId,rating,ts\n"
    f"10,500,4,{T0 + 3600}\n"
    f"10,700,2,{T0 + DAY + 60}\n"
    f"30,500,5,{T0 + 3 * DAY}\n"
    f"10,900,3.5,{T0 + 4 * DAY + 10}\n"
    f"30,700,1,{T0 + 4 * DAY + 5}\n"
)


def _spec(path: Path, out: Path, **kwargs: object) -> ImportSpec:
    fmt = "parquet" if path.suffix == ".parquet" else "csv"
    args: dict[str, object] = {"columns": MAPPING, "thresholds": {"label": 4.0}, **kwargs}
    return ImportSpec(path=path, format=fmt, out_dir=out, **args)  # type: ignore[arg-type]


def _logs(world: Path) -> dict[str, np.ndarray]:
    table = pads.dataset(world / "logs", partitioning="hive").to_table()
    table = table.sort_by("impression_id")
    return {name: table.column(name).to_numpy() for name in table.column_names}


def _write_csv(tmp_path: Path, text: str, name: str = "ratings.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- validation -------------------------------------------------------------------------------


def test_bad_rows_are_named_by_column_line_and_count(tmp_path: Path) -> None:
    csv = _write_csv(
        tmp_path,
        "userId,movieId,rating,ts\n"
        f"1,5,4,{T0}\n"  # line 2: fine
        f"-1,5,4,{T0}\n"  # line 3: negative user
        f"2,x7,4,yesterday\n"  # line 4: item and timestamp
        f"3.5,5,4,{T0}\n"  # line 5: non-integer user
        "4,5,4\n"  # line 6: malformed line
        f"5,6,good,{T0}\n"  # line 7: rating
        f",6,4,{T0}\n",  # line 8: empty user
    )
    with pytest.raises(LogImportError) as err:
        import_logs(_spec(csv, tmp_path / "world"))
    by_column = {p.column: p for p in err.value.problems}
    assert set(by_column) == {"(row)", "userId", "movieId", "ts", "rating"}
    assert by_column["userId"].bad_rows == 3
    assert by_column["userId"].first_rows == ("line 3", "line 5", "line 8")
    assert by_column["userId"].values == ("'-1'", "'3.5'", "''")
    assert by_column["movieId"].first_rows == ("line 4",)
    assert by_column["ts"].first_rows == ("line 4",) and "ISO 8601" in by_column["ts"].reason
    assert by_column["rating"].first_rows == ("line 7",)
    assert by_column["(row)"].first_rows == ("line 6",)
    message = str(err.value)
    for text in ("'userId' (user_id)", "3 bad row(s): line 3, line 5, line 8", "'ts'", "line 6"):
        assert text in message
    assert not (tmp_path / "world").exists()  # nothing written


def test_many_bad_rows_show_the_first_few_and_the_count(tmp_path: Path) -> None:
    rows = "".join(f"{i},5,4,{'bad' if i % 2 else T0}\n" for i in range(40))
    csv = _write_csv(tmp_path, "userId,movieId,rating,ts\n" + rows)
    with pytest.raises(LogImportError) as err:
        import_logs(_spec(csv, tmp_path / "world"))
    (problem,) = err.value.problems
    assert problem.column == "ts" and problem.bad_rows == 20
    assert problem.first_rows == ("line 3", "line 5", "line 7", "line 9", "line 11")
    assert "20 bad row(s): line 3, line 5, line 7, line 9, line 11, ..." in str(err.value)


def test_missing_mapped_column_is_named(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path, "user,movieId,rating,ts\n1,5,4,100\n")
    with pytest.raises(LogImportError) as err:
        import_logs(_spec(csv, tmp_path / "world"))
    (problem,) = err.value.problems
    assert problem.column == "userId" and problem.target == "user_id"
    assert "user, movieId, rating, ts" in str(err.value)


def test_parquet_bad_values_are_named_by_row(tmp_path: Path) -> None:
    path = tmp_path / "logs.parquet"
    table = pa.table(
        {
            "userId": pa.array([1, None, 3, -4], pa.int64()),
            "movieId": pa.array([5.0, 6.5, 7.0, 8.0]),
            "rating": pa.array([1.0, 2.0, float("nan"), 4.0]),
            "ts": pa.array([T0, T0, T0, T0], pa.int64()),
        }
    )
    pq.write_table(table, path)
    with pytest.raises(LogImportError) as err:
        import_logs(_spec(path, tmp_path / "world"))
    by_column = {p.column: p for p in err.value.problems}
    assert by_column["userId"].first_rows == ("row 2", "row 4")
    assert by_column["movieId"].first_rows == ("row 2",)
    assert by_column["rating"].first_rows == ("row 3",)


def test_spec_is_validated() -> None:
    base = {"path": Path("x.csv"), "format": "csv", "out_dir": Path("w")}
    with pytest.raises(ValueError, match="unknown target"):
        ImportSpec(columns={**MAPPING, "rating": "r"}, **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timestamp"):
        ImportSpec(columns={"user_id": "u", "item_id": "i"}, **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="either label or like"):
        ImportSpec(columns={**MAPPING, "like": "l"}, **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold for 'share'"):
        ImportSpec(columns=MAPPING, thresholds={"share": 1.0}, **base)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format"):
        ImportSpec(columns=MAPPING, **{**base, "format": "json"})  # type: ignore[arg-type]


def test_time_span_outside_the_layout_is_refused(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path, f"userId,movieId,rating,ts\n1,5,4,{T0}\n2,5,4,{T0 + DAY}\n")
    with pytest.raises(LogImportError, match="span 2 day"):
        import_logs(_spec(csv, tmp_path / "world"))
    # milliseconds read as seconds: ~30 years of "days"
    ms = _write_csv(tmp_path, f"userId,movieId,rating,ts\n1,5,4,0\n2,5,4,{T0 * 1000}\n", "ms.csv")
    with pytest.raises(LogImportError, match="timestamp unit"):
        import_logs(_spec(ms, tmp_path / "world"))


# --- round trips --------------------------------------------------------------------------------


def test_csv_round_trip(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path, GOOD_CSV)
    result = import_logs(_spec(csv, tmp_path / "world"))
    world = WorldLayout(tmp_path / "world")
    assert (result.rows, result.n_users, result.n_items, result.n_days) == (5, 2, 3, 5)
    assert result.empty_days == (2,) and result.quarantine is None
    assert result.day_origin == T0 and not world.has_truth

    logs = _logs(world.root)
    assert logs["impression_id"].tolist() == [0, 1, 2, 3, 4]  # time order
    assert logs["day"].tolist() == [0, 1, 3, 4, 4]
    assert logs["user_id"].tolist() == [0, 0, 1, 1, 0]  # 10 -> 0, 30 -> 1
    assert logs["post_id"].tolist() == [0, 1, 0, 1, 2]  # 500, 700, 900 -> 0, 1, 2
    np.testing.assert_allclose(logs["ts"], [1 / 24, 1 + 60 / DAY, 3, 4 + 5 / DAY, 4 + 10 / DAY])
    assert logs["like"].tolist() == [1, 0, 1, 0, 0]  # rating >= 4
    assert logs["view"].tolist() == [1] * 5
    assert logs["comment"].tolist() == [0] * 5 and logs["dwell"].tolist() == [0.0] * 5
    assert (logs["day"] == np.floor(logs["ts"])).all()

    users = pq.read_table(world.users).to_pydict()
    assert users["source_user_id"] == [10, 30] and users["signup_day"] == [0, 3]
    assert users["user_segment"] == [0, 0]
    posts = pq.read_table(world.posts)
    assert posts.column("source_item_id").to_pylist() == [500, 700, 900]
    created = posts.column("created_at").to_numpy()
    np.testing.assert_allclose(created, [1 / 24, 1 + 60 / DAY, 4 + 10 / DAY])  # first seen
    content = posts.column("content_emb").combine_chunks().flatten().to_numpy()
    assert not content.any() and set(posts.column("topic").to_pylist()) == {0}
    assert pq.read_table(world.follows).num_rows == 0
    cfg = load_world_config(world)
    assert (cfg.n_users, cfg.n_posts, cfg.n_days, cfg.n_topics) == (2, 3, 5, 1)
    assert cfg.post_lifetime_days > cfg.n_days  # items never expire
    source = json.loads(world.source.read_text())
    assert source["kind"] == "imported_logs" and source["label_columns"] == {"like": "rating"}


def test_parquet_round_trip_matches_csv(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path, GOOD_CSV)
    import_logs(_spec(csv, tmp_path / "from_csv"))
    rows = [line.split(",") for line in GOOD_CSV.strip().splitlines()[1:]]
    path = tmp_path / "logs.parquet"
    table = pa.table(
        {
            "userId": pa.array([int(r[0]) for r in rows], pa.int32()),
            "movieId": pa.array([int(r[1]) for r in rows], pa.int64()),
            "rating": pa.array([float(r[2]) for r in rows]),
            # an Arrow timestamp column, not epoch numbers
            "ts": pa.array([int(r[3]) * 1000 for r in rows], pa.timestamp("ms", tz="UTC")),
        }
    )
    pq.write_table(table, path)
    import_logs(_spec(path, tmp_path / "from_parquet"))
    a, b = _logs(tmp_path / "from_csv"), _logs(tmp_path / "from_parquet")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_log_schema_is_the_generators(tmp_path: Path) -> None:
    cfg = WorldConfig(
        n_users=30,
        n_creators=10,
        n_posts=60,
        n_days=4,
        impressions_per_day=20,
        n_topics=2,
        session_len=5,
        pool_size=10,
        follows_per_user=0.5,
    )
    generated = generate_world(cfg, tmp_path / "generated", progress=False)
    schema = pq.read_schema(generated.log_day(0) / "part-0.parquet")
    assert schema.remove_metadata().equals(LOG_SCHEMA)
    import_logs(_spec(_write_csv(tmp_path, GOOD_CSV), tmp_path / "imported"))
    imported = pq.read_schema(WorldLayout(tmp_path / "imported").log_day(0) / "part-0.parquet")
    assert imported.remove_metadata().equals(LOG_SCHEMA)
    for entity in ("users", "posts", "creators", "follows"):
        gen = pq.read_schema(getattr(generated, entity))
        imp = pq.read_schema(getattr(WorldLayout(tmp_path / "imported"), entity))
        for f in gen:  # imported entities carry every generated column (plus source ids)
            assert imp.field(f.name).type == f.type, (entity, f.name)


def test_iso_timestamps_labels_and_implicit_feedback(tmp_path: Path) -> None:
    csv = _write_csv(
        tmp_path,
        "u,i,when,liked,secs\n"
        "1,1,2001-01-01T10:00:00Z,true,3.5\n"
        "1,2,2001-01-02 00:00:00,false,0\n"
        "2,1,2001-01-05T00:00:00+00:00,1,12\n",
    )
    columns = {"user_id": "u", "item_id": "i", "timestamp": "when", "like": "liked"}
    spec = ImportSpec(csv, "csv", {**columns, "dwell": "secs"}, tmp_path / "a")
    import_logs(spec)
    logs = _logs(tmp_path / "a")
    assert logs["day"].tolist() == [0, 1, 4]
    assert logs["like"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(logs["dwell"], [3.5, 0.0, 12.0])

    implicit = ImportSpec(csv, "csv", {k: columns[k] for k in REQUIRED}, tmp_path / "b")
    assert import_logs(implicit).implicit_feedback
    assert _logs(tmp_path / "b")["like"].tolist() == [1, 1, 1]


def test_skip_bad_rows_quarantines_everything_it_drops(tmp_path: Path) -> None:
    text = GOOD_CSV + "x,500,4,1\n" + f"11,500,4,{T0}\n" + "1,2\n" + f"12,-5,4,{T0}\n"
    csv = _write_csv(tmp_path, text)
    result = import_logs(_spec(csv, tmp_path / "world", skip_bad_rows=True))
    assert (result.rows, result.bad_rows, result.rows_read) == (6, 3, 9)
    assert (
        result.quarantine
        == quarantine_path(tmp_path / "world")
        == tmp_path / "world.quarantine.parquet"
    )
    bad = pq.read_table(result.quarantine).to_pydict()
    assert sorted(bad["_source_row"]) == [7, 9, 10]
    by_line = dict(zip(bad["_source_row"], bad["_problems"], strict=True))
    assert "userId (user_id)" in by_line[7] and "movieId (item_id)" in by_line[10]
    assert "fields" in by_line[9]
    assert "x" in bad["userId"]  # the source values are kept, as text
    assert len(_logs(tmp_path / "world")["user_id"]) == 6


def test_directory_of_files_and_overwrite(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = GOOD_CSV.strip().splitlines()
    (src / "a.csv").write_text("\n".join(lines[:3]) + "\n")
    (src / "b.csv").write_text("\n".join([lines[0], *lines[3:]]) + "\nbad,1,1,1\n")
    (src / "notes.txt").write_text("ignored")
    with pytest.raises(LogImportError, match=r"b\.csv line 5"):
        import_logs(_spec(src, tmp_path / "world"))
    result = import_logs(_spec(src, tmp_path / "world", skip_bad_rows=True))
    assert result.rows == 5 and len(result.files) == 2
    with pytest.raises(FileExistsError):
        import_logs(_spec(src, tmp_path / "world", skip_bad_rows=True))
    (src / "b.csv").write_text("\n".join([lines[0], *lines[3:]]) + "\n")
    again = import_logs(_spec(src, tmp_path / "world", overwrite=True))
    assert again.quarantine is None and not quarantine_path(tmp_path / "world").exists()


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_imports_and_exits_2_on_bad_rows(tmp_path: Path) -> None:
    csv = _write_csv(tmp_path, GOOD_CSV)
    args = ["logs", "import", "--path", str(csv), "--format", "csv", "--out"]
    mapping = ["--map", "user_id=userId,item_id=movieId", "--map", "timestamp=ts,label=rating"]
    res = CliRunner().invoke(main, [*args, str(tmp_path / "w"), *mapping, "--threshold", "label=4"])
    assert res.exit_code == 0, res.output
    assert "imported 5 interactions" in res.output and "like=rating>=4" in res.output

    bad = _write_csv(tmp_path, GOOD_CSV + "1,2,3,later\n", "bad.csv")
    args[3] = str(bad)
    res = CliRunner().invoke(main, [*args, str(tmp_path / "w2"), *mapping])
    assert res.exit_code == 2
    assert "'ts' (timestamp)" in res.output and "line 7" in res.output

    res = CliRunner().invoke(main, [*args, str(tmp_path / "w2"), "--map", "user_id=userId"])
    assert res.exit_code == 2 and "timestamp" in res.output
    res = CliRunner().invoke(main, [*args, str(tmp_path / "w2"), "--map", "user_id"])
    assert res.exit_code == 2 and "TARGET=COLUMN" in res.output


def test_cli_preprocess_rejects_options_of_the_other_split(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["preprocess", "--run-dir", str(tmp_path), "--ratios", "8:1:1"])
    assert res.exit_code == 2 and "--ratios: only with --split random" in res.output
    res = CliRunner().invoke(
        main, ["preprocess", "--run-dir", str(tmp_path), "--split", "random", "--ratios", "8:0:1"]
    )
    assert res.exit_code == 2 and "TRAIN:VALID:TEST" in res.output


# --- random ratio split -------------------------------------------------------------------------


def test_random_split_cuts_each_user_by_the_ratios() -> None:
    rng = np.random.default_rng(0)
    counts = {0: 10, 1: 5, 2: 1, 3: 2, 4: 100, 5: 20}
    users = np.concatenate([np.full(n, u) for u, n in counts.items()])
    ids = rng.permutation(len(users)) * 3 + 7  # unique, unordered, not dense
    split = random_split(ids, users, (8.0, 1.0, 1.0), seed=0)
    assert split.impression_id.tolist() == sorted(ids.tolist())
    names = split.of(ids)
    expected = {
        0: (8, 1, 1),
        1: (4, 1, 0),
        2: (1, 0, 0),
        3: (2, 0, 0),
        4: (80, 10, 10),
        5: (16, 2, 2),
    }
    for user, want in expected.items():
        got = tuple(int((names[users == user] == s).sum()) for s in SPLITS)
        assert got == want, user


def test_random_split_is_deterministic_and_seeded() -> None:
    rng = np.random.default_rng(1)
    users = rng.integers(0, 50, size=2000)
    ids = np.arange(2000)
    a = random_split(ids, users, (8.0, 1.0, 1.0), seed=3)
    shuffled = rng.permutation(2000)
    b = random_split(ids[shuffled], users[shuffled], (8.0, 1.0, 1.0), seed=3)
    np.testing.assert_array_equal(a.split, b.split)  # the arrival order does not matter
    c = random_split(ids, users, (8.0, 1.0, 1.0), seed=4)
    assert (a.split != c.split).any()
    shares = np.bincount(a.split, minlength=3) / 2000
    np.testing.assert_allclose(shares, [0.8, 0.1, 0.1], atol=0.02)
    with pytest.raises(ValueError, match="unknown impression_id"):
        a.of(np.array([5000]))
    with pytest.raises(ValueError, match="unique"):
        random_split(np.array([1, 1]), np.array([0, 0]), (8.0, 1.0, 1.0), seed=0)


def test_preprocess_config_validates_the_split() -> None:
    base = {"world_dir": Path("w"), "out_dir": Path("o")}
    assert PreprocessConfig(**base, split="random", ratios=(7, 2, 1)).ratios == (7, 2, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="split"):
        PreprocessConfig(**base, split="user")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratios"):
        PreprocessConfig(**base, split="random", ratios=(8, 0, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ratios"):
        PreprocessConfig(**base, split="random", ratios=(8, 1))  # type: ignore[arg-type]
