import numpy as np
import pytest

from feedrec.features.tables import EntityAttributes, FeatureTables
from feedrec.features.vocabulary import Vocabulary
from feedrec.schema.registry import HISTORY_LEN, RAW_COLUMNS, WINDOW_DAYS

N_DAYS, U, P, C, T = 10, 3, 4, 2, 3


def _attrs() -> EntityAttributes:
    return EntityAttributes(
        user_segment=np.array([0, 1, 2]),
        post_creator=np.array([0, 0, 1, 1]),
        post_topic=np.array([0, 1, 2, 1]),
        post_media=np.array([0, 1, 2, 0]),
        post_created_at=np.array([-1.0, 0.5, 2.0, 3.0]),
        post_content=np.ones((P, 32), np.float32),
        creator_followers=np.array([5.0, 7.0], np.float32),
    )


def _tables(seed: int = 0, day_changed: int | None = None) -> FeatureTables:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, 5, size=(N_DAYS, U, 6)).astype(float)
    user_topic = rng.integers(0, 5, size=(N_DAYS, U, T, 2)).astype(float)
    post = rng.integers(0, 5, size=(N_DAYS, P, 6)).astype(float)
    creator = rng.integers(0, 5, size=(N_DAYS, C, 3)).astype(float)
    if day_changed is not None:
        for a in (user, user_topic, post, creator):
            a[day_changed] += 100
    return FeatureTables.from_daily(
        _attrs(),
        user_daily=user,
        user_topic_daily=user_topic,
        post_daily=post,
        creator_daily=creator,
    )


def test_windows_use_only_earlier_days() -> None:
    rng = np.random.default_rng(0)
    user = rng.integers(0, 5, size=(N_DAYS, U, 6)).astype(float)
    t = _tables()
    assert t.user.shape[0] == N_DAYS + 1  # includes the serving day
    assert (t.user[0] == 0).all()  # nothing is known before day 0
    d = 9
    np.testing.assert_allclose(t.user[d], user[d - WINDOW_DAYS : d].sum(axis=0))


def test_no_leakage_from_the_same_or_later_days() -> None:
    base, changed = _tables(), _tables(day_changed=5)
    for name in ("user", "user_topic", "post", "creator"):
        np.testing.assert_array_equal(getattr(base, name)[:6], getattr(changed, name)[:6])
        assert (getattr(changed, name)[6] != getattr(base, name)[6]).any()


def test_lookup_returns_every_raw_column_with_shapes() -> None:
    t = _tables()
    raw = t.lookup(
        np.array([0, 2]), np.array([1, 3]), np.array([4, 9]), np.array([4.5, 9.2]), np.array([0, 3])
    )
    for c in RAW_COLUMNS:
        assert raw[c.name].shape == ((2, c.length) if c.length else (2,)), c.name
    np.testing.assert_allclose(raw["p_age_days"], [4.0, 6.2], rtol=1e-6)
    assert raw["u_recent_topics"].shape[1] == HISTORY_LEN


def test_as_of_slice_gives_the_same_lookup() -> None:
    t = _tables()
    args = (np.array([1]), np.array([2]))
    full = t.lookup(*args, np.array([7]), np.array([7.0]), np.array([0]))
    sliced = t.as_of(7).lookup(*args, np.array([7]), np.array([7.0]), np.array([0]))
    for k in full:
        np.testing.assert_array_equal(full[k], sliced[k])
    with pytest.raises(ValueError, match="day"):
        t.as_of(7).lookup(*args, np.array([6]), np.array([6.0]), np.array([0]))


def test_unknown_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="user_id"):
        _tables().lookup(
            np.array([U]), np.array([0]), np.array([1]), np.array([1.0]), np.array([0])
        )


def test_vocabulary_lookup() -> None:
    v = Vocabulary.fit(np.array([5, 3, 3, 9, -1]))
    assert v.num_rows == 4
    assert v.lookup(np.array([3, 5, 9, 4, -1, 100])).tolist() == [1, 2, 3, 0, -1, 0]
