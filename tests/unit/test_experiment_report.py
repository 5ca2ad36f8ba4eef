"""Experiment statistics: delta-method intervals cover, lifts and sessions are right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from feedrec.experiments.experiment_report import (
    METRICS,
    analyse,
    ratio_estimate,
    user_sums,
    write_report,
)
from feedrec.experiments.user_simulator import SimulationConfig, UserSimulator
from feedrec.world import PRESETS, generate_world


def _exposures(rng: np.random.Generator, rates: dict[str, float], users: int = 300) -> pd.DataFrame:
    """Users with 1-6 feeds of 10 slots; a user's like rate varies around the arm's rate
    (users differ, so slots of one user are correlated, as in real traffic). Feeds come in
    pairs 100 s apart; pairs are 5000 s apart (sessions)."""
    arms = np.array(list(rates))[np.arange(users) % len(rates)]
    p_user = np.clip(rng.normal([rates[a] for a in arms], 0.05), 0.0, 1.0)
    n_feeds = rng.integers(1, 7, size=users)
    user = np.repeat(np.arange(users), n_feeds)
    feed = np.concatenate([np.arange(n) for n in n_feeds])
    at = np.concatenate([np.cumsum(np.where(np.arange(n) % 2, 100.0, 5000.0)) for n in n_feeds])
    slot_user, slot_feed = np.repeat(user, 10), np.repeat(feed, 10)
    n = len(slot_user)
    like = (rng.random(n) < p_user[slot_user]).astype(int)
    return pd.DataFrame(
        {
            "request_id": [f"{u:08d}{f:024d}" for u, f in zip(slot_user, slot_feed, strict=True)],
            "variant": arms[slot_user],
            "user_id": slot_user,
            "position": np.tile(np.arange(10), len(user)),
            "received_at": np.repeat(at, 10),
            "impressed": 1,
            "like": like,
            "comment": 0,
            "share": 0,
            "hide": (rng.random(n) < 0.02).astype(int),
            "dwell": 3.0 * like,
            "latency_ms": 50.0,
            "fallback": False,
            "cold_start": False,
        }
    )


def test_ratio_estimate_matches_the_hand_computed_delta_method() -> None:
    y, x = np.array([1.0, 3.0, 0.0, 4.0]), np.array([2.0, 4.0, 1.0, 5.0])
    est = ratio_estimate(y, x)
    r = 8 / 12
    var = (np.var(y, ddof=1) - 2 * r * np.cov(x, y)[0, 1] + r * r * np.var(x, ddof=1)) / (
        4 * 3.0**2
    )
    assert est.value == pytest.approx(r) and est.se == pytest.approx(np.sqrt(var))


def test_intervals_cover_the_true_difference_about_95_percent() -> None:
    """120 simulated experiments with a true like-rate lift of 0.03 and users who differ
    (so one user's slots are correlated): the 95 % CI contains 0.03 in 88-99 % of them."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(120):
        report = analyse(_exposures(rng, {"control": 0.13, "popularity": 0.10}, users=200))
        low, high = report.lift("like_rate", "control").ci
        covered += low <= 0.03 <= high
    assert 0.88 <= covered / 120 <= 0.99, covered


def test_sessions_are_split_by_the_gap_and_counted_per_user() -> None:
    rng = np.random.default_rng(1)
    exposures = _exposures(rng, {"control": 0.1, "popularity": 0.1}, users=10)
    sums = user_sums(exposures, session_gap_s=1000.0).set_index("user_id")
    feeds = exposures.groupby("user_id")["request_id"].nunique()
    assert (sums.loc[feeds.index, "feeds"] == feeds).all()
    assert (
        sums.loc[feeds.index, "sessions"] == (feeds + 1) // 2
    ).all()  # pairs of feeds, 5000 s apart


def test_truth_lift_and_report_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    exposures = _exposures(rng, {"control": 0.2, "popularity": 0.1}, users=400)
    truth = exposures[["request_id", "position", "variant"]].assign(
        e_like=np.where(exposures["variant"] == "control", 0.2, 0.1),
        e_comment=0.0,
        e_share=0.0,
        e_hide=0.02,
        e_dwell=0.0,
    )
    report = analyse(exposures, truth=truth)
    lift = report.lift("like_rate", "control")
    assert lift.truth == pytest.approx(0.1) and lift.significant and lift.truth_agrees
    assert report.lift("engagement_rate", "control").truth == pytest.approx(0.1)
    path = write_report(report, tmp_path)
    text = path.read_text()
    assert all(m in text for m in METRICS) and "ground truth" in text
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_bad_inputs_name_the_problem() -> None:
    rng = np.random.default_rng(3)
    one_arm = _exposures(rng, {"control": 0.1}, users=5)
    with pytest.raises(ValueError, match="two variants"):
        analyse(one_arm)
    two = _exposures(rng, {"control": 0.1, "popularity": 0.1}, users=6)
    with pytest.raises(ValueError, match="baseline"):
        analyse(two, baseline="nope")
    with pytest.raises(ValueError, match="fatigue"):
        SimulationConfig(fatigue=0.0)


def test_simulated_users_react_with_the_worlds_probabilities(tmp_path: Path) -> None:
    """Averaged over many draws, outcomes match the expectations the simulator logs, fatigue
    lowers them, and a like never comes without a view."""
    world = generate_world(PRESETS["debug"], tmp_path / "w", progress=False)
    sim = UserSimulator("http://unused", world.root, 5, SimulationConfig(fatigue=0.5))
    rng = np.random.default_rng(0)
    posts = np.arange(10)
    likes, views = np.zeros(10), np.zeros(10)
    for _ in range(4000):
        outcomes, expected = sim.react(3, posts, 0, 0, 5.5, rng)
        likes += outcomes["like"]
        views += outcomes["view"]
        assert not (outcomes["like"] & ~outcomes["view"]).any()
        expected_like = expected["like"]
    assert likes / 4000 == pytest.approx(expected_like, abs=0.03)
    assert views / 4000 == pytest.approx(expected["view"], abs=0.03)
    _, tired = sim.react(3, posts, 0, 2, 5.5, rng)  # third page: fatigue 0.5 ** 2
    assert tired["view"] == pytest.approx(0.25 * expected["view"])
    assert tired["like"] == pytest.approx(0.25 * expected_like)
