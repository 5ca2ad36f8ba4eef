"""The Ray Data preprocess job on the debug world: splits, point-in-time features, outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from feedrec.data import PreprocessLayout
from feedrec.data.examples import columns_from_arrow
from feedrec.data.preprocess import load_entity_attributes
from feedrec.runtime import RunLayout
from feedrec.schema import example_arrow_schema
from feedrec.world.layout import WorldLayout


def _examples(run: Path, split: str) -> dict[str, np.ndarray]:
    return columns_from_arrow(pq.read_table(PreprocessLayout(RunLayout(run).data).examples(split)))


def test_time_based_split_and_counts(debug_run: Path) -> None:
    data = PreprocessLayout(RunLayout(debug_run).data)
    meta = data.read_meta()
    assert meta["test_days"] == [5] and meta["valid_days"] == [4]
    assert sum(meta["rows"].values()) == 6 * 4000
    for split, days in (("train", meta["train_days"]), ("valid", [4]), ("test", [5])):
        assert set(np.unique(_examples(debug_run, split)["day"])) == set(days)


def test_examples_follow_the_registry_schema(debug_run: Path) -> None:
    table = pq.read_table(PreprocessLayout(RunLayout(debug_run).data).examples("test"))
    expected = example_arrow_schema()
    for field in expected:
        assert table.schema.field(field.name).type == field.type, field.name


def test_features_are_point_in_time(debug_run: Path) -> None:
    """Recompute user and post aggregates from the raw logs, using only earlier days."""
    run = RunLayout(debug_run)
    logs = pads.dataset(run.world / "logs", partitioning="hive").to_table().to_pandas()
    ex = _examples(debug_run, "test")
    rng = np.random.default_rng(0)
    for i in rng.choice(len(ex["day"]), size=25, replace=False):
        day, user, post = int(ex["day"][i]), int(ex["user_id"][i]), int(ex["post_id"][i])
        window = logs[(logs.day < day) & (logs.day >= day - 7) & (logs.user_id == user)]
        assert ex["u_imps"][i] == len(window)
        assert ex["u_likes"][i] == window.like.sum()
        prior = logs[(logs.day < day) & (logs.post_id == post)]
        assert ex["p_imps"][i] == len(prior) and ex["p_hides"][i] == prior.hide.sum()


def test_retrieval_pairs_are_engaged_training_rows(debug_run: Path) -> None:
    data = PreprocessLayout(RunLayout(debug_run).data)
    pairs = columns_from_arrow(pq.read_table(data.pairs))
    engaged = pairs["like"] + pairs["comment"] + pairs["share"]
    assert len(engaged) == data.read_meta()["pairs"] > 0
    assert (engaged > 0).all()
    assert set(np.unique(pairs["day"])) <= set(data.read_meta()["train_days"])


def test_rerun_is_idempotent(debug_run: Path, tmp_path: Path) -> None:
    from feedrec.data import PreprocessConfig, run_preprocess

    run = RunLayout(debug_run)
    again = run_preprocess(PreprocessConfig(run.world, tmp_path / "again", progress=False))
    first = PreprocessLayout(run.data).read_meta()
    assert again.read_meta()["rows"] == first["rows"]
    run_preprocess(PreprocessConfig(run.world, tmp_path / "again", progress=False))
    assert again.read_meta()["rows"] == first["rows"]  # overwrite, not append


def test_seen_and_hidden_pairs_match_the_logs(debug_run: Path) -> None:
    """Serving filters on these: every logged impression, and every creator with a hide."""
    run = RunLayout(debug_run)
    data = PreprocessLayout(run.data)
    attrs = load_entity_attributes(WorldLayout(run.world))
    logs = pads.dataset(run.world / "logs", partitioning="hive").to_table().to_pandas()
    users, posts = logs.user_id.to_numpy(), logs.post_id.to_numpy()
    np.testing.assert_array_equal(np.load(data.seen), np.unique(users * attrs.n_posts + posts))
    hid = logs.hide.to_numpy() > 0
    n_creators = len(attrs.creator_followers)
    hidden = np.unique(users[hid] * n_creators + attrs.post_creator[posts[hid]])
    assert len(hidden) > 0
    np.testing.assert_array_equal(np.load(data.hidden), hidden)


def test_days_the_world_does_not_count_yet_are_left_out(debug_run: Path, tmp_path: Path) -> None:
    """The event sink writes live traffic of the serving day (day n_days) into ``logs/``; it
    is an open day, not part of the 6-day world, until ``world.json`` counts it."""
    import shutil

    from feedrec.data import PreprocessConfig, run_preprocess

    world = tmp_path / "world"
    shutil.copytree(RunLayout(debug_run).world, world)
    day5 = next((world / "logs" / "day=5").glob("*.parquet"))
    (world / "logs" / "day=6").mkdir()
    shutil.copy(day5, world / "logs" / "day=6" / "live-000000000000-000000000010.parquet")
    out = run_preprocess(PreprocessConfig(world, tmp_path / "data", progress=False))
    assert (
        out.read_meta()["rows"] == PreprocessLayout(RunLayout(debug_run).data).read_meta()["rows"]
    )


def test_joining_day_by_day_in_groups_gives_the_same_examples(
    debug_run: Path, tmp_path: Path
) -> None:
    """A zero join budget makes every day its own Ray Data pass, appended to the same output
    (what large logs do): the examples equal those of the one-pass default."""
    from feedrec.data import PreprocessConfig, run_preprocess

    run = RunLayout(debug_run)
    grouped = run_preprocess(
        PreprocessConfig(run.world, tmp_path / "data", join_memory_mb=0, progress=False)
    )
    for split in ("train", "valid", "test"):
        default = pq.read_table(PreprocessLayout(run.data).examples(split))
        chunked = pq.read_table(grouped.examples(split))
        # one Parquet file per day pass at least
        assert len(list(grouped.examples(split).glob("*.parquet"))) >= (
            4 if split == "train" else 1
        )
        a = columns_from_arrow(default.sort_by("impression_id"))
        b = columns_from_arrow(chunked.sort_by("impression_id"))
        for name, column in a.items():
            np.testing.assert_array_equal(column, b[name], err_msg=f"{split}.{name}")
