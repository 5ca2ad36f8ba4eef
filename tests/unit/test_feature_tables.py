from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from feedrec.data import preprocess
from feedrec.data.examples import EXAMPLE_SCHEMA, arrow_from_columns
from feedrec.features.tables import (
    KIND_STATS,
    EntityAttributes,
    FeatureSnapshot,
    FeatureTables,
    SparseStats,
    topic_slots,
)
from feedrec.features.vocabulary import Vocabulary
from feedrec.schema.registry import (
    CONTENT_DIM,
    HISTORY_LEN,
    LABELS,
    RAW_COLUMNS,
    SHOWN_TOPICS_LEN,
    WINDOW_DAYS,
)

N_DAYS, U, P, C, T = 10, 3, 4, 2, 3


def _attrs() -> EntityAttributes:
    return EntityAttributes(
        user_segment=np.array([0, 1, 2]),
        post_creator=np.array([0, 0, 1, 1]),
        post_topic=np.array([0, 1, 2, 1]),
        post_media=np.array([0, 1, 2, 0]),
        post_created_at=np.array([-1.0, 0.5, 2.0, 3.0]),
        post_content=np.random.default_rng(7).normal(size=(P, CONTENT_DIM)).astype(np.float32),
        creator_followers=np.array([5.0, 7.0], np.float32),
    )


def _dense(seed: int = 0, day_changed: int | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dense = {
        "user": rng.integers(0, 5, size=(N_DAYS, U, 6)).astype(float),
        "user_topic": rng.integers(0, 5, size=(N_DAYS, U, T, 2)).astype(float),
        "user_content": rng.normal(size=(N_DAYS, U, CONTENT_DIM)),
        "post": rng.integers(0, 5, size=(N_DAYS, P, 6)).astype(float),
        "creator": rng.integers(0, 5, size=(N_DAYS, C, 3)).astype(float),
    }
    if day_changed is not None:
        for a in dense.values():
            a[day_changed] += 100
    return dense


def _tables(seed: int = 0, day_changed: int | None = None) -> FeatureTables:
    d = _dense(seed, day_changed)
    return FeatureTables.from_dense(
        _attrs(),
        user_daily=d["user"],
        user_topic_daily=d["user_topic"],
        user_content_daily=d["user_content"],
        post_daily=d["post"],
        creator_daily=d["creator"],
    )


def _as_dense(stats: SparseStats, n: int) -> np.ndarray:
    out = np.zeros((n, stats.n_stats))
    out[stats.keys] = stats.values
    return out


def test_windows_use_only_earlier_days() -> None:
    dense, t = _dense(), _tables()
    assert t.days == range(N_DAYS + 1)  # includes the serving day
    first = t.snapshot(0).stats
    assert not len(first.user.keys) and not len(first.post.keys)  # nothing known before day 0
    d = 9
    snap = t.snapshot(d).stats
    np.testing.assert_allclose(
        _as_dense(snap.user, U), dense["user"][d - WINDOW_DAYS : d].sum(axis=0)
    )
    np.testing.assert_allclose(
        _as_dense(snap.user_topic, U * T).reshape(U, T, 2),
        dense["user_topic"][d - WINDOW_DAYS : d].sum(axis=0),
    )
    np.testing.assert_allclose(
        _as_dense(snap.user_content, U),
        dense["user_content"][d - WINDOW_DAYS : d].sum(axis=0),
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(_as_dense(snap.post, P), dense["post"][:d].sum(axis=0))
    np.testing.assert_allclose(
        _as_dense(snap.creator, C), dense["creator"][d - WINDOW_DAYS : d].sum(axis=0)
    )


def test_no_leakage_from_the_same_or_later_days() -> None:
    base, changed = _tables(), _tables(day_changed=5)
    for day in range(6):
        a, b = base.snapshot(day).stats, changed.snapshot(day).stats
        for kind in KIND_STATS:
            np.testing.assert_array_equal(getattr(a, kind).values, getattr(b, kind).values)
    a, b = base.snapshot(6).stats, changed.snapshot(6).stats
    for kind in KIND_STATS:
        assert (getattr(b, kind).values != getattr(a, kind).values).any(), kind


def test_lookup_returns_every_raw_column_with_shapes() -> None:
    t = _tables()
    raw = t.lookup(
        np.array([0, 2]), np.array([1, 3]), np.array([4, 9]), np.array([4.5, 9.2]), np.array([0, 3])
    )
    for c in RAW_COLUMNS:
        assert raw[c.name].shape == ((2, c.length) if c.length else (2,)), c.name
    np.testing.assert_allclose(raw["p_age_days"], [4.0, 6.2], rtol=1e-6)
    assert raw["u_recent_topics"].shape[1] == HISTORY_LEN


def test_lookup_matches_a_dense_reference() -> None:
    """Every statistic and the liked-topic history against sums over dense arrays."""
    dense, t = _dense(seed=3), _tables(seed=3)
    users, posts = np.array([0, 1, 2, 2, 0]), np.array([3, 0, 1, 2, 2])
    days = np.array([8, 2, 5, 9, 0])
    raw = t.lookup(users, posts, days, days + 0.5, np.zeros(5))
    for i, (u, p, d) in enumerate(zip(users, posts, days, strict=True)):
        w = slice(max(0, d - WINDOW_DAYS), d)
        np.testing.assert_allclose(raw["u_likes"][i], dense["user"][w, u, 1].sum())
        np.testing.assert_allclose(
            raw["u_liked_content"][i], dense["user_content"][w, u].sum(axis=0), atol=1e-5
        )
        np.testing.assert_allclose(raw["p_dwell"][i], dense["post"][:d, p, 5].sum())
        c = _attrs().post_creator[p]
        np.testing.assert_allclose(raw["c_hides"][i], dense["creator"][w, c, 2].sum())
        topic_likes = dense["user_topic"][w, u, :, 1].sum(axis=0)
        np.testing.assert_allclose(raw["ut_likes"][i], topic_likes[_attrs().post_topic[p]])
        order = np.argsort(-topic_likes, kind="stable")[:HISTORY_LEN]
        expected = np.where(topic_likes[order] > 0, order, -1)
        expected = np.pad(expected, (0, HISTORY_LEN - len(expected)), constant_values=-1)
        np.testing.assert_array_equal(raw["u_recent_topics"][i], expected)
        topic_imps = dense["user_topic"][w, u, :, 0].sum(axis=0)
        shown = raw["u_shown_topics"][i]
        slots = np.bincount(shown[shown >= 0], minlength=T)
        assert slots.sum() == (SHOWN_TOPICS_LEN if topic_imps.sum() else 0)
        if topic_imps.sum():  # each topic's share of the slots is its share of impressions
            share = topic_imps / topic_imps.sum()
            assert np.abs(slots / SHOWN_TOPICS_LEN - share).max() < 1 / SHOWN_TOPICS_LEN


def test_full_and_restricted_snapshots_give_the_same_lookup() -> None:
    t = _tables()
    args = (np.array([1]), np.array([2]))
    full = t.lookup(*args, np.array([7]), np.array([7.0]), np.array([0]))
    sliced = t.snapshot(7).lookup(*args, np.array([7]), np.array([7.0]), np.array([0]))
    restricted = t.snapshot(7, users=np.array([1]), posts=np.array([2]))
    assert len(restricted.stats.user.keys) == 1
    kept = restricted.lookup(*args, np.array([7]), np.array([7.0]), np.array([0]))
    for k in full:
        np.testing.assert_array_equal(full[k], sliced[k])
        np.testing.assert_array_equal(full[k], kept[k])
    with pytest.raises(ValueError, match="day"):
        t.snapshot(7).lookup(*args, np.array([6]), np.array([6.0]), np.array([0]))


def test_unknown_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="user_id"):
        _tables().lookup(
            np.array([U]), np.array([0]), np.array([1]), np.array([1.0]), np.array([0])
        )


def test_save_and_load_round_trip_and_refuse_the_old_layout(tmp_path: Path) -> None:
    t = _tables()
    t.save(tmp_path / "tables.npz")
    loaded = FeatureTables.load(tmp_path / "tables.npz")
    args = (np.array([0, 2]), np.array([1, 3]), np.array([4, 9]), np.array([4.5, 9.2]))
    a, b = t.lookup(*args, np.zeros(2)), loaded.lookup(*args, np.zeros(2))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    snap = FeatureSnapshot.load(tmp_path / "tables.npz", 4)
    np.testing.assert_array_equal(snap.stats.post.values, t.snapshot(4).stats.post.values)
    np.savez(tmp_path / "old.npz", user=np.zeros((2, U, 6)))
    with pytest.raises(ValueError, match="preprocess"):
        FeatureTables.load(tmp_path / "old.npz")


def test_an_output_of_older_code_is_not_current(tmp_path: Path) -> None:
    out = preprocess.PreprocessLayout(tmp_path)
    assert not out.is_current()  # nothing there
    _tables().save(out.tables)
    assert not out.is_current()  # no meta.json: the run did not finish
    out.meta.write_text("{}")
    assert not out.is_current()  # no examples
    train = out.examples("train")
    train.mkdir(parents=True)
    example = {c.name: np.zeros((1, c.length) if c.length else 1) for c in RAW_COLUMNS}
    example.update({name: np.zeros(1) for name in ("impression_id", "day", "ts", "propensity")})
    example.update({label: np.zeros(1) for label in LABELS})
    table = arrow_from_columns(example, EXAMPLE_SCHEMA)
    pq.write_table(table, train / "0.parquet")
    assert out.is_current()
    pq.write_table(table.drop_columns(["u_shown_topics"]), train / "0.parquet")
    assert not out.is_current()  # examples written before that column was declared
    pq.write_table(table, train / "0.parquet")
    np.savez(out.tables, format=np.asarray(2))  # the layout before user_content
    assert not out.is_current()


def test_daily_sums_fold_batches_sparsely_like_dense_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The preprocess accumulator: batches merged several times give the dense sums."""
    monkeypatch.setattr(preprocess, "_MERGE_ROWS", 10)  # merge after almost every batch
    rng = np.random.default_rng(1)
    attrs, n = _attrs(), 500
    logs = {
        "day": rng.integers(0, N_DAYS, n),
        "user_id": rng.integers(0, U, n),
        "post_id": rng.integers(0, P, n),
        **{label: rng.integers(0, 2, n).astype(np.float32) for label in LABELS},
    }
    logs["topic"] = attrs.post_topic[logs["post_id"]]
    logs["creator_id"] = attrs.post_creator[logs["post_id"]]
    sums = preprocess.DailySums(attrs, N_DAYS, T)
    for start in range(0, n, 64):
        sums.add({k: v[start : start + 64] for k, v in logs.items()})
    tables = sums.tables()
    user = np.zeros((N_DAYS, U, 6))
    np.add.at(user[..., 0], (logs["day"], logs["user_id"]), 1)
    np.add.at(user[..., 5], (logs["day"], logs["user_id"]), logs["dwell"])
    ut_likes = np.zeros((N_DAYS, U, T))
    np.add.at(ut_likes, (logs["day"], logs["user_id"], logs["topic"]), logs["like"])
    liked_content = np.zeros((N_DAYS, U, CONTENT_DIM))
    content = attrs.post_content[logs["post_id"]] * logs["like"][:, None]
    np.add.at(liked_content, (logs["day"], logs["user_id"]), content)
    for d in range(N_DAYS):
        got_user = _as_dense(tables.daily["user"][d], U)[:, [0, 5]]
        np.testing.assert_allclose(got_user, user[d][:, [0, 5]], rtol=1e-6)
        got = _as_dense(tables.daily["user_topic"][d], U * T).reshape(U, T, 2)[..., 1]
        np.testing.assert_allclose(got, ut_likes[d])
        liked = _as_dense(tables.daily["user_content"][d], U)
        np.testing.assert_allclose(liked, liked_content[d], rtol=1e-5, atol=1e-5)
        # a row only for users who liked something that day
        assert set(tables.daily["user_content"][d].keys) == set(np.flatnonzero(ut_likes[d].sum(1)))
    seen, hidden = sums.pairs()
    np.testing.assert_array_equal(seen, np.unique(logs["user_id"] * P + logs["post_id"]))
    hid = logs["hide"] > 0
    np.testing.assert_array_equal(
        hidden, np.unique(logs["user_id"][hid] * C + logs["creator_id"][hid])
    )


def test_vocabulary_lookup() -> None:
    v = Vocabulary.fit(np.array([5, 3, 3, 9, -1]))
    assert v.num_rows == 4
    assert v.lookup(np.array([3, 5, 9, 4, -1, 100])).tolist() == [1, 2, 3, 0, -1, 0]


def test_join_day_groups_fit_the_budget() -> None:
    t = _tables()
    days = list(range(N_DAYS))
    assert preprocess.day_chunks(t, days, 0) == [[d] for d in days]
    assert preprocess.day_chunks(t, days, 1 << 30) == [days]
    per_day = 2 * sum(p[3].nbytes for p in t.daily.values())
    groups = preprocess.day_chunks(t, days, 3 * per_day)
    assert [d for g in groups for d in g] == days and 1 < len(groups) < N_DAYS
    # join statistics: the day's snapshot, only for the users and posts logged that day
    stats = preprocess.join_stats(t, 5)
    np.testing.assert_array_equal(stats.user.keys, t.daily["user"][5].keys)
    full = t.snapshot(5).stats.post
    np.testing.assert_array_equal(
        stats.post.values, full.values[np.isin(full.keys, stats.post.keys)]
    )


def _apportion(counts: np.ndarray, slots: int) -> np.ndarray:
    """Largest remainder, one row at a time: floors, then +1 by remainder (ties: lower id)."""
    if counts.sum() == 0:
        return np.zeros(len(counts), np.int64)
    exact = counts.astype(np.float64) * slots / counts.sum(dtype=np.float64)
    alloc = np.floor(exact).astype(np.int64)
    rest = sorted(range(len(counts)), key=lambda t: (-(exact[t] - alloc[t]), t))
    for t in rest[: slots - alloc.sum()]:
        alloc[t] += 1
    return alloc


@pytest.mark.parametrize("seed", range(20))
def test_topic_slots_apportion_like_largest_remainder(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_topics, slots = int(rng.integers(1, 40)), int(rng.integers(1, 20))
    counts = rng.poisson(rng.uniform(0.1, 3), size=(30, n_topics)).astype(np.float32)
    counts[rng.random(30) < 0.2] = 0  # users with no impressions in the window
    out = topic_slots(counts, slots)
    assert out.shape == (30, slots) and out.dtype == np.int64
    for row, c in zip(out, counts, strict=True):
        ids = row[row >= 0]
        assert (row[len(ids) :] == -1).all() and (np.diff(ids) >= 0).all()
        np.testing.assert_array_equal(np.bincount(ids, minlength=n_topics), _apportion(c, slots))


def test_topic_slots_follow_shares_not_totals() -> None:
    out = topic_slots(np.array([[3.0, 1.0, 0.0], [30.0, 10.0, 0.0], [0.0, 0.0, 0.0]]), 4)
    assert out.tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [-1, -1, -1, -1]]
