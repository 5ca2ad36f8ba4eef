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
