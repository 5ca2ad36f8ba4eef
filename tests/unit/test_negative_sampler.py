import numpy as np
import pytest

from feedrec.features.tables import EntityAttributes
from feedrec.schema.registry import CONTENT_DIM
from feedrec.training.negative_sampler import NegativeSampler
from feedrec.world.config import eligible_posts

N_POSTS = 400
LIFETIME = 3.0


def _attrs() -> EntityAttributes:
    rng = np.random.default_rng(0)
    return EntityAttributes(
        user_segment=np.zeros(5, np.int64),
        post_creator=rng.integers(0, 7, N_POSTS),
        post_topic=rng.integers(0, 4, N_POSTS),
        post_media=rng.integers(0, 3, N_POSTS),
        post_created_at=rng.uniform(-LIFETIME, 10.0, N_POSTS),
        post_content=rng.random((N_POSTS, CONTENT_DIM), dtype=np.float32),
        creator_followers=np.ones(7, np.int64),
    )


def test_draws_cover_exactly_the_posts_eligible_on_the_row_day() -> None:
    attrs = _attrs()
    sampler = NegativeSampler.of(attrs, LIFETIME)
    # what reaches the object store: the post arrays, not every user's and creator's
    assert (sampler.attrs.n_posts, sampler.attrs.n_users, sampler.attrs.n_creators) == (400, 0, 0)
    rng = np.random.default_rng(1)
    for day in (0, 4, 9):
        n = 20_000
        ts = day + rng.random(n)
        cols, drawn = sampler.sample(np.full(n, day), ts, rng)
        assert drawn.all()
        eligible = eligible_posts(attrs.post_created_at, day, LIFETIME)
        drawn, counts = np.unique(cols["post_id"], return_counts=True)
        np.testing.assert_array_equal(drawn, eligible)  # all of them, nothing else
        expected = n / len(eligible)  # uniform: every count within 5 sigma of n / |eligible|
        assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))
        post = cols["post_id"]
        np.testing.assert_allclose(cols["p_age_days"], ts - attrs.post_created_at[post], rtol=1e-5)
        np.testing.assert_array_equal(cols["topic"], attrs.post_topic[post])
        np.testing.assert_array_equal(cols["content_emb"], attrs.post_content[post])


def test_same_seed_same_draws() -> None:
    sampler = NegativeSampler.of(_attrs(), LIFETIME)
    day, ts = np.array([2, 5, 5, 8]), np.array([2.1, 5.5, 5.9, 8.0])
    a = sampler.sample(day, ts, np.random.default_rng(7))[0]["post_id"]
    b = sampler.sample(day, ts, np.random.default_rng(7))[0]["post_id"]
    np.testing.assert_array_equal(a, b)


def test_a_day_without_eligible_posts_draws_nothing() -> None:
    # e.g. the first day of imported logs: every post is created at its first interaction
    sampler = NegativeSampler.of(_attrs(), LIFETIME)
    day = np.array([4, 40, -9, 5])
    cols, drawn = sampler.sample(day, day + 0.5, np.random.default_rng(0))
    assert drawn.tolist() == [True, False, False, True]
    assert len(cols["post_id"]) == 4  # placeholders keep the rows aligned


def test_log_proposal_is_the_chance_to_be_drawn() -> None:
    attrs = _attrs()
    sampler = NegativeSampler.of(attrs, LIFETIME)
    rows = {2: 300, 6: 100}
    prob = np.exp(sampler.log_proposal(rows))
    assert prob.sum() == pytest.approx(1.0, abs=1e-6)
    rng = np.random.default_rng(3)
    days = np.repeat([2, 6], [30_000, 10_000])
    drawn = sampler.sample(days, days + 0.5, rng)[0]["post_id"]
    empirical = np.bincount(drawn, minlength=N_POSTS) / len(drawn)
    np.testing.assert_allclose(empirical, prob, atol=0.004)
    never = np.setdiff1d(
        np.arange(N_POSTS),
        np.union1d(*(eligible_posts(attrs.post_created_at, d, LIFETIME) for d in rows)),
    )
    assert np.all(prob[never] < 1e-9)  # a floor, not -inf: the logQ correction stays finite


def test_sampler_needs_a_lifetime() -> None:
    with pytest.raises(ValueError, match="lifetime_days"):
        NegativeSampler.of(_attrs(), 0.0)
