"""The oracle's references in evaluation: interests estimated from logged impressions."""

from __future__ import annotations

import numpy as np

from feedrec.evaluation.evaluate import interests_from_impressions


def test_interests_divide_out_the_topic_share_of_the_eligible_posts() -> None:
    share = np.array([0.5, 0.25, 0.25])
    impressions = np.array(
        [
            [0.0, 0.0, 0.0],  # never shown anything: the prior, uniform
            [4.0, 2.0, 2.0],  # shown topics exactly in proportion to their share: uniform
            [6.0, 2.0, 0.0],  # ratios 12, 8, 0 plus one pseudo-impression each
        ]
    )
    theta = interests_from_impressions(impressions, share)
    np.testing.assert_allclose(theta[0], [1 / 3] * 3)
    np.testing.assert_allclose(theta[1], [1 / 3] * 3)
    np.testing.assert_allclose(theta[2], np.array([13.0, 9.0, 1.0]) / 23.0)
    assert theta.dtype == np.float64 and theta.shape == (3, 3)


def test_interests_sharpen_with_more_impressions_and_ignore_empty_topics() -> None:
    share = np.array([0.5, 0.5, 0.0])  # no eligible post has topic 2
    few = interests_from_impressions(np.array([[3.0, 1.0, 0.0]]), share)[0]
    many = interests_from_impressions(np.array([[30.0, 10.0, 0.0]]), share)[0]
    assert few[0] > few[1] > few[2] and many[0] > few[0] and many[2] < few[2]
    np.testing.assert_allclose([few.sum(), many.sum()], 1.0)


def test_the_truth_without_taste_differs_only_in_the_latent_term() -> None:
    from feedrec.world.truth import LATENT_DIM, N_MEDIA, N_SEGMENTS, GroundTruth

    rng = np.random.default_rng(0)
    users, posts = 5, 30
    gt = GroundTruth(
        theta=rng.dirichlet(np.ones(4), users),
        z_user=rng.standard_normal((users, LATENT_DIM)),
        segment=rng.integers(0, N_SEGMENTS, users),
        z_post=rng.standard_normal((posts, LATENT_DIM)),
        topic=rng.integers(0, 4, posts),
        media=rng.integers(0, N_MEDIA, posts),
        creator=rng.integers(0, 6, posts),
        created_at=rng.uniform(0.0, 5.0, posts),
        quality=rng.normal(0.0, 0.5, 6),
        media_pref=rng.normal(0.0, 1.0, (N_SEGMENTS, N_MEDIA)),
    )
    u, p = np.repeat(np.arange(users), posts), np.tile(np.arange(posts), users)
    no_taste = gt.without_taste()
    latent = 0.5 * np.einsum("nl,nl->n", gt.z_user[u], gt.z_post[p]) / np.sqrt(LATENT_DIM)
    np.testing.assert_allclose(gt.affinity(u, p) - no_taste.affinity(u, p), latent, atol=1e-12)
    assert np.abs(gt.z_user).sum() > 0  # the original keeps its taste
