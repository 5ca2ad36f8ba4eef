"""Off-policy evaluation on the live service: an exploring variant logs exact propensities,
simulated users react with the world's ground truth, and IPS of rankings the service never
served recovers the value the world assigns them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from feedrec.events.event_log import EventLog
from feedrec.events.event_sink import EventSink
from feedrec.events.feed_event import SERVED
from feedrec.serving.exploration import Exploration
from feedrec.serving.stack import ServingStack, StackConfig

EPSILON, POOL = 0.5, 15
EXPLORATION = Exploration(epsilon=EPSILON, pool_size=POOL)
EXPERIMENT = {
    "name": "e2e-explore",
    "variants": [{"name": "explore", "weight": 1.0, "exploration": EXPLORATION.model_dump()}],
}


@pytest.fixture(scope="module")
def events_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ope-events")


@pytest.fixture(scope="module")
def explore_stack(trained_run: Path, http_port: int, events_dir: Path) -> Iterator[ServingStack]:
    overrides = {"events_dir": str(events_dir), "experiment": EXPERIMENT}
    config = StackConfig(run_dir=trained_run, http_port=http_port, service_overrides=overrides)
    with ServingStack(config) as s:
        yield s


def test_exploring_feeds_log_the_pool_and_exact_propensities(
    explore_stack: ServingStack, events_dir: Path
) -> None:
    """Every served slot's logged propensity is mu(post, slot) of its pool; unexplored feeds
    are the pool's head; explored ones draw from it; debug responses say which."""
    ids = set()
    with httpx.Client(timeout=30) as client:
        for user in range(40):
            r = client.post(f"{explore_stack.url}/v1/feed", json={"user_id": user, "count": 8})
            assert r.status_code == 200, r.text
            assert r.json()["variant"] == "explore"
            ids.add(r.json()["request_id"])
        debug = client.post(
            f"{explore_stack.url}/v1/feed", json={"user_id": 3, "count": 8, "debug": True}
        ).json()
    assert isinstance(debug["debug"]["explored"], bool)
    served = [
        r.payload
        for r in EventLog(events_dir).records()
        if r.payload["kind"] == SERVED and r.payload["request_id"] in ids
    ]
    assert len(served) == 40
    explored = 0
    for feed in served:
        pool, posts = feed["pool"], [i["post_id"] for i in feed["items"]]
        assert len(pool) == POOL and len(posts) == 8 and set(posts) <= set(pool)
        mu = [i["propensity"] for i in feed["items"]]
        greedy = np.asarray(posts) == np.asarray(pool[:8])
        assert np.allclose(mu, EXPLORATION.propensity(greedy, POOL))
        if not feed["explored"]:
            assert posts == pool[:8]
        explored += feed["explored"]
    assert 5 <= explored <= 35  # ~Binomial(40, 0.5)


def reversed_policy(logged):
    return [pool[::-1][: len(posts)] for pool, posts in zip(logged.pool, logged.posts, strict=True)]


def test_ips_of_unserved_rankings_recovers_their_ground_truth_value(
    explore_stack: ServingStack, trained_run: Path, events_dir: Path, tmp_path: Path
) -> None:
    """Simulated users use the exploring variant for 75 s; the sink compacts their events,
    every one of them; ``feedrec experiments ope`` estimates the logging chain without
    exploration and the trained ranker re-scoring each pool (run locally, not in Triton), and
    a reversed ranking is estimated through the library. Each estimate's error against the
    world's value of that ranking in the same contexts is what exact propensities and
    truth-sampled rewards produce: within the central 99.9 % of 20,000 replays of the same
    feeds (``replicate_errors``)."""
    import pandas as pd

    from feedrec.cli import main
    from feedrec.data import PreprocessLayout
    from feedrec.experiments.experiment_report import read_exposures
    from feedrec.experiments.off_policy import (
        LoggedFeeds,
        SimulatedContexts,
        evaluate_policy,
        greedy_policy,
        in_se,
        ranker_policy,
        replicate_errors,
        true_values,
    )
    from feedrec.experiments.user_simulator import SimulationConfig, UserSimulator
    from feedrec.runtime import RunLayout
    from feedrec.serving.config import ServiceConfig
    from feedrec.serving.online_store import OnlineFeatureStore
    from feedrec.world.generator import truth_for_day
    from feedrec.world.layout import WorldLayout

    run = RunLayout(trained_run)
    serving_day = int(PreprocessLayout(run.data).read_meta()["serving_day"])
    # 75 s, not 45: the reversed ranking's estimate rests on the few explored slots that match
    # it (weight ~30 each), and its interval is only as good as their count. At 45 s a CI run
    # saw almost none rewarded: IPS 0.016 +- 0.017 against a truth of 0.53.
    # A new seed every run, printed to replay it: with one fixed seed every run reuses the same
    # uniform draws, so runs share their luck and the chance failure rates claimed below do
    # not hold (with seed 0, two local runs in a row drew ~10 % fewer engagements than the
    # truth expected, 1.7-1.9 se, and a CI run's greedy estimate fell 3.8 se low).
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"\nsimulation seed {seed}")
    cfg = SimulationConfig(
        duration_s=75, rate_rps=8, clients=4, users=300, min_return_s=5, seed=seed
    )
    sim_dir = tmp_path / "sim"
    result = UserSimulator(explore_stack.url, run.world, serving_day, cfg).run(sim_dir)
    assert result.failed_feeds == 0
    world = tmp_path / "world"
    EventSink(EventLog(events_dir), world).run(flush=True)
    exposures = read_exposures(world)
    # No event is lost between the users and the exposure log: one per impression, view,
    # engagement and dwell (a viewed post always has a dwell > 0).
    labels = ["impressed", "view", "like", "comment", "share", "hide"]
    logged_events = int(exposures[labels].to_numpy(np.int64).sum() + (exposures["dwell"] > 0).sum())
    assert logged_events == result.events

    out = tmp_path / "ope"
    args = ["experiments", "ope", "--run-dir", str(trained_run), "--world-dir", str(world)]
    args += ["--simulation-dir", str(sim_dir), "--candidate", f"trained={run.ranker}"]
    cli = CliRunner().invoke(main, [*args, "--out-dir", str(out)])
    assert cli.exit_code == 0, cli.output
    report = json.loads((out / "ope.json").read_text())
    print(f"\n{result.summary()}\n{cli.output}")
    # A flagged fallback feed (a ranking deadline missed under load) logs no pool: the one kind
    # of served feed off-policy evaluation cannot use.
    fallbacks = exposures.loc[exposures["fallback"], "request_id"].nunique()
    assert report["feeds"] == result.feeds - fallbacks and 0.35 < report["explored"] < 0.65
    policies = {p["name"]: p for p in report["policies"]}
    assert set(policies) == {"greedy", "trained"}
    for p in policies.values():
        assert p["interval_reliable"], p  # the chain's own rankings match hundreds of slots
    # The trained ranker re-scoring the pool is (almost) the chain that built the pool: it shows
    # the logged post in most slots of the feeds served greedily, and in explored feeds (a random
    # order of the pool) only by chance. So the bound scales with the greedy share: a fixed 0.4
    # failed at 0.395 when the run's random seed explored a few more feeds than half.
    assert policies["trained"]["match_rate"] > 0.7 * (1.0 - report["explored"])

    truth = pd.read_parquet(sim_dir / "truth.parquet")
    logged = LoggedFeeds.from_exposures(exposures)
    logged = logged.subset(np.isin(logged.request_id, truth["request_id"]))  # simulated only
    contexts = SimulatedContexts.of(logged, truth, cfg.fatigue)
    ground = truth_for_day(WorldLayout(run.world), serving_day)
    store = OnlineFeatureStore.load(run.data, run.world)
    rules = ServiceConfig.from_run(run.root).rerank_config()
    targets = {
        "greedy": greedy_policy(logged),
        "trained": ranker_policy(run.ranker, store, rules)(logged),
        "reversed": reversed_policy(logged),
    }
    # The same lists the CLI evaluated: the world values them as the report does.
    for name in ("greedy", "trained"):
        value = float(true_values(ground, logged, targets[name], contexts).mean())
        assert value == pytest.approx(policies[name]["truth"], rel=1e-9), name
    worst = evaluate_policy("reversed", logged, targets["reversed"])
    worst_truth = float(true_values(ground, logged, targets["reversed"], contexts).mean())
    print(
        f"reversed: IPS {worst.ips.value:.4f} ± {1.96 * worst.ips.se:.4f} truth {worst_truth:.4f}"
        f" from {worst.rewarded_matches} rewarded matches"
    )

    logging = report["logging"]
    live = {
        "logging": in_se(logging["value"] - report["logging_truth"], logging["se"]),
        **{n: in_se(p["ips"]["value"] - p["truth"], p["ips"]["se"]) for n, p in policies.items()},
        "reversed": in_se(worst.ips.value - worst_truth, worst.ips.se),
    }
    # Why not "each 99.9 % interval holds the truth": the delta-method interval of a heavily
    # weighted estimate is skewed. Replays of a CI run's own feeds put the trained ranker's
    # 99.9 % |error| at 4.6-5.1 se (the reversed ranking's 4.7), nearly all of it below the
    # truth: when few weight-30 slots happen to be rewarded, estimate and se are both low. Four
    # checks at 0.1 % each: a correct service fails this test by chance once in ~250 runs.
    replays = replicate_errors(ground, logged, contexts, targets, EXPLORATION, runs=20_000)
    for name, error in live.items():
        bound = float(np.quantile(np.abs(replays[name]), 0.999))
        print(f"{name}: error {error:+.2f} se, replays' 99.9 % |error| {bound:.2f} se")
        assert np.isfinite(bound) and abs(error) <= bound, (name, error, bound, report)
    # Only explored slots can match a ranking this far from the chain's: far fewer effective
    # samples, which the report's diagnostics show.
    assert worst.match_rate < 0.2 and worst.ess < policies["greedy"]["ess"] / 4
