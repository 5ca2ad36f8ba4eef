"""The exploring logging policy: its logged propensities are the true slot probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from feedrec.serving.experiment import Experiment, Variant
from feedrec.serving.exploration import Exploration


def test_logged_propensities_are_the_empirical_slot_frequencies() -> None:
    """Over many requests, post j sits in slot k as often as mu(j, k) says, for every (j, k)
    of the pool, including the greedy diagonal and the posts past the feed's length."""
    explore = Exploration(epsilon=0.3, pool_size=6)
    m, k, n = 6, 3, 20_000
    counts = np.zeros((m, k))
    logged: dict[tuple[int, int], float] = {}
    explored = 0
    for r in range(n):
        slate = explore.slate(f"req-{r}", m, k)
        explored += slate.explored
        for slot, (j, p) in enumerate(zip(slate.index, slate.propensity, strict=True)):
            counts[j, slot] += 1
            logged.setdefault((int(j), slot), float(p))
    expected = explore.propensity(np.arange(m)[:, None] == np.arange(k)[None, :], m)
    assert np.allclose(expected.sum(axis=0), 1.0)  # every slot is filled by exactly one post
    se = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) < 4.5 * se), (counts / n, expected)
    for (j, slot), p in logged.items():
        assert p == pytest.approx(expected[j, slot])
    assert abs(explored / n - 0.3) < 4.5 * np.sqrt(0.3 * 0.7 / n)


def test_the_draw_is_a_function_of_the_request_id() -> None:
    explore = Exploration(epsilon=0.5, pool_size=10)
    a, b = explore.slate("abc", 10, 4), explore.slate("abc", 10, 4)
    assert a.explored == b.explored and np.array_equal(a.index, b.index)
    draws = {tuple(explore.slate(f"r{i}", 10, 4).index) for i in range(50)}
    assert len(draws) > 10  # not one fixed permutation


def test_without_exploration_the_feed_is_the_greedy_prefix_with_probability_one() -> None:
    slate = Exploration().slate("abc", 8, 5)
    assert not slate.explored
    assert slate.index.tolist() == [0, 1, 2, 3, 4]
    assert slate.propensity.tolist() == [1.0] * 5
    assert Exploration().pool_for(5) == 5
    assert Exploration(epsilon=0.1, pool_size=20).pool_for(5) == 20
    assert Exploration(epsilon=0.1, pool_size=20).pool_for(50) == 50


def test_a_short_pool_fills_what_it_can() -> None:
    slate = Exploration(epsilon=1.0, pool_size=20).slate("x", 3, 5)
    assert sorted(slate.index.tolist()) == [0, 1, 2] and slate.explored
    assert np.allclose(slate.propensity, 1 / 3)


@pytest.mark.parametrize(
    "bad",
    [
        {"epsilon": -0.1},
        {"epsilon": 1.5},
        {"pool_size": 0},
        {"temperature": 1.0},
    ],
)
def test_bad_exploration_config_is_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        Exploration.model_validate(bad)


def test_only_the_model_policy_explores() -> None:
    with pytest.raises(ValidationError, match="exploration needs policy 'model'"):
        Variant(name="pop", weight=1, policy="popularity", exploration=Exploration(epsilon=0.2))
    experiment = Experiment.model_validate(
        {
            "name": "ope",
            "variants": [
                {"name": "explore", "weight": 1, "exploration": {"epsilon": 0.2, "pool_size": 30}}
            ],
        }
    )
    assert experiment.assign(7).exploration == Exploration(epsilon=0.2, pool_size=30)
