import numpy as np
import pytest

from feedrec.training.candidate_probability import AGE_BINS, CandidateProbability

N_POSTS = 50


def _young_positives(rng: np.random.Generator, n: int = 40_000) -> tuple[np.ndarray, np.ndarray]:
    post = rng.integers(0, N_POSTS, n) ** 2 % N_POSTS  # uneven shares
    return post, rng.exponential(1.5, n).clip(0, 7.0)  # liked posts are mostly young


def test_in_batch_only_is_the_share_of_the_positives_at_any_age() -> None:
    post, age = _young_positives(np.random.default_rng(0))
    prob = CandidateProbability.of(post, age, N_POSTS)
    share = (np.bincount(post, minlength=N_POSTS) + 0.5) / (len(post) + 0.5 * N_POSTS)
    ids = np.arange(N_POSTS)
    for at in (0.1, 6.0):
        np.testing.assert_allclose(np.exp(prob.log_q(ids, np.full(N_POSTS, at))), share, rtol=1e-5)


def test_mixed_is_a_distribution_over_the_random_draws_ages() -> None:
    rng = np.random.default_rng(1)
    post, age = _young_positives(rng)
    proposal = np.log(np.full(N_POSTS, 1.0 / N_POSTS))
    random_age = rng.uniform(0.0, 7.0, 40_000)
    prob = CandidateProbability.of(post, age, N_POSTS, proposal, random_age)
    # Summed over posts and weighted by the random draws' age density, q is one slot's law.
    mids = (prob.age_edges[:-1] + prob.age_edges[1:]) / 2
    density = np.histogram(random_age, prob.age_edges)[0] / len(random_age)
    total = sum(
        d * np.exp(prob.log_q(np.arange(N_POSTS), np.full(N_POSTS, m))).sum()
        for m, d in zip(mids, density, strict=True)
    )
    assert total == pytest.approx(1.0, abs=0.02)
    # Young candidates are likelier than old ones of the same post: a liked post is young.
    one = np.array([np.bincount(post).argmax()])
    assert prob.log_q(one, np.array([0.2]))[0] > prob.log_q(one, np.array([6.5]))[0] + 0.5
    # Ages past either end take the end bins, never an index error.
    assert np.isfinite(prob.log_q(np.array([3, 3]), np.array([-1.0, 99.0]))).all()
    assert len(prob.log_age_ratio) == AGE_BINS


def test_same_ages_reduce_to_the_age_blind_mixture() -> None:
    rng = np.random.default_rng(2)
    post, _ = _young_positives(rng)
    ages = rng.uniform(0.0, 7.0, len(post))
    proposal = np.log(rng.dirichlet(np.ones(N_POSTS)))
    prob = CandidateProbability.of(post, ages, N_POSTS, proposal, rng.uniform(0.0, 7.0, 400_000))
    blind = np.logaddexp(prob.log_positive, proposal) - np.log(2.0)
    got = prob.log_q(np.arange(N_POSTS), np.full(N_POSTS, 3.3))
    np.testing.assert_allclose(got, blind, atol=0.1)


def test_without_random_draws_it_is_the_age_blind_mixture() -> None:
    # e.g. an imported log whose days have no eligible post yet: every slot undrawn
    post, age = _young_positives(np.random.default_rng(3))
    proposal = np.log(np.full(N_POSTS, 1.0 / N_POSTS))
    prob = CandidateProbability.of(post, age, N_POSTS, proposal, np.zeros(0))
    blind = np.logaddexp(prob.log_positive, proposal) - np.log(2.0)
    for at in (0.1, 6.0):
        got = prob.log_q(np.arange(N_POSTS), np.full(N_POSTS, at))
        np.testing.assert_allclose(got, blind, rtol=1e-6)


def test_a_proposal_per_post() -> None:
    with pytest.raises(ValueError, match="one log_proposal per post"):
        CandidateProbability(np.zeros(N_POSTS), np.zeros(3))
