from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from feedrec.world import PRESETS, GroundTruth, WorldConfig, WorldLayout, generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldLayout:
    return generate_world(PRESETS["debug"], tmp_path_factory.mktemp("w"), progress=False)


def _logs(layout: WorldLayout):
    return pads.dataset(layout.logs, partitioning="hive").to_table().to_pandas()


def test_deterministic_by_seed(world: WorldLayout, tmp_path: Path) -> None:
    again = generate_world(PRESETS["debug"], tmp_path / "again", progress=False)
    a, b = _logs(world), _logs(again)
    assert a.equals(b)
    other = generate_world(PRESETS["debug"].with_overrides(seed=1), tmp_path / "o", progress=False)
    assert not a.equals(_logs(other))


def test_logs_are_day_partitioned_with_all_days(world: WorldLayout) -> None:
    days = sorted(int(p.name.split("=")[1]) for p in world.logs.iterdir())
    assert days == list(range(PRESETS["debug"].n_days))


def test_suggested_posts_never_from_followed_creators(world: WorldLayout) -> None:
    logs = _logs(world)
    posts = pq.read_table(world.posts).to_pandas()
    follows = pq.read_table(world.follows).to_pandas()
    shown = logs.merge(posts[["post_id", "creator_id"]], on="post_id")
    hit = shown.merge(follows, on=["user_id", "creator_id"])
    assert len(follows) > 0 and len(hit) == 0


def test_labels_and_propensities_are_consistent(world: WorldLayout) -> None:
    logs = _logs(world)
    for task in ("like", "comment", "share", "hide"):
        assert (logs[task] <= logs["view"]).all(), task
    assert ((logs["dwell"] > 0) == (logs["view"] == 1)).all()
    assert ((logs["propensity"] > 0) & (logs["propensity"] <= 1)).all()
    assert 0.01 < logs["like"].mean() < 0.3


def test_posts_are_shown_only_after_creation(world: WorldLayout) -> None:
    logs = _logs(world)
    created = pq.read_table(world.posts).column("created_at").to_numpy()
    assert (logs["ts"].to_numpy() > created[logs["post_id"].to_numpy()]).all()


def test_truth_probabilities_are_ordered(world: WorldLayout) -> None:
    gt = GroundTruth.load(world.latent)
    users, posts = np.arange(50), np.arange(50)
    p = gt.probabilities(users, posts, ts=3.0, position=0)
    assert (p["like"] <= p["view"]).all() and (p["hide"] <= p["view"]).all()
    lower = gt.probabilities(users, posts, ts=3.0, position=5)
    assert (lower["view"] < p["view"]).all()  # position bias


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="n_users"):
        WorldConfig(n_users=0, n_creators=1, n_posts=1, n_days=5, impressions_per_day=10)
    with pytest.raises(ValueError, match="unknown field"):
        PRESETS["debug"].with_overrides(n_userz=3)
