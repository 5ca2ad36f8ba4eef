"""Off-policy evaluation: what a new ranking would have earned, from the feeds already served.

Input: the exposure log (``<world>/live/exposures``, one row per served slot) of a variant that
explores (:mod:`feedrec.serving.exploration`). Each of its feeds logs the pool its slots were
drawn from, the post in every slot, that post's probability ``mu`` of being in that slot, and
what the viewer did with it.

A *target policy* maps each logged feed to the list it would have shown instead, from the same
pool. Its value, the expected reward per feed (default: likes + comments + shares over the
feed's slots), is estimated with the item-position model (Li et al., "Offline Evaluation of
Ranking Policies with Click Models", KDD 2018). That model assumes the reward of a slot depends
on the post in that slot and on the slot, not on the other posts. The synthetic world's users
behave exactly so: their position bias has no cascade. Per feed ``i`` and slot ``k``, with
``a_ik`` the logged post and ``pi_ik`` the target's::

    w_ik  = [pi_ik == a_ik] / mu_ik
    IPS   = sum_i sum_k w_ik r_ik / N
    SNIPS = sum_i sum_k w_ik r_ik / sum_i c_i,   c_i = sum_k w_ik / K_i   (E[c_i] = 1)

IPS is unbiased when every target post is in the pool (``mu > 0``). SNIPS trades a small bias
for less variance. Feeds of one user are correlated, so both are ratios of per-user sums, with
the delta method's variance over users (``experiment_report.ratio_estimate``).
The diagnostics are the share of slots where the target agrees with the log, the effective
sample size ``(sum w)^2 / sum w^2`` and the largest weight.

Ground truth (simulated traffic): :func:`true_values` recomputes what the simulated users were
expected to do with the target's lists (``user_simulator.expected_outcomes``) in the same
contexts: viewer, time, session slot, page. This is the value the estimate must recover. It
conditions on the logged feed requests. A better feed would also lengthen sessions, which OPE
of single feeds does not see, by design.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from feedrec.experiments.experiment_report import Z95, Estimate, ratio_estimate
from feedrec.experiments.user_simulator import expected_outcomes
from feedrec.serving.exploration import Exploration
from feedrec.serving.online_store import OnlineFeatureStore
from feedrec.serving.rerank import RerankConfig, rerank
from feedrec.world.truth import GroundTruth

#: Reward of a slot: the sum of these exposure-log labels.
ENGAGEMENTS = ("like", "comment", "share")
#: Below this many rewarded slots where the target agrees with the log, an IPS interval rests
#: on a handful of heavy terms: its delta-method variance is itself a guess from those few and
#: the interval under-covers (a CI run of the live test: a reversed ranking's IPS 0.016 +-
#: 0.017 against a truth of 0.53, from about one rewarded match). Reports flag such estimates.
MIN_REWARDED_MATCHES = 20


@dataclass(frozen=True)
class LoggedFeeds:
    """The explored feeds of one variant, a row per feed (N feeds, ragged slots).

    request_id, variant: str [N]; user_id: int64 [N]; ts: float64 [N] world time; posts,
    propensity, reward: per feed [K_i] (the served post, its mu, its reward), in slot order;
    pool: per feed int64 [M_i], the pool in the chain's order.
    """

    request_id: np.ndarray
    variant: np.ndarray
    user_id: np.ndarray
    ts: np.ndarray
    posts: list[np.ndarray]
    propensity: list[np.ndarray]
    reward: list[np.ndarray]
    pool: list[np.ndarray]
    explored: np.ndarray

    def __len__(self) -> int:
        return len(self.request_id)

    def subset(self, keep: np.ndarray) -> LoggedFeeds:
        """The feeds where ``keep`` (bool [N]) holds."""
        idx = np.flatnonzero(keep).tolist()
        return LoggedFeeds(
            request_id=self.request_id[idx],
            variant=self.variant[idx],
            user_id=self.user_id[idx],
            ts=self.ts[idx],
            posts=[self.posts[i] for i in idx],
            propensity=[self.propensity[i] for i in idx],
            reward=[self.reward[i] for i in idx],
            pool=[self.pool[i] for i in idx],
            explored=self.explored[idx],
        )

    @classmethod
    def from_exposures(
        cls,
        exposures: pd.DataFrame,
        variant: str | None = None,
        reward: Sequence[str] = ENGAGEMENTS,
    ) -> LoggedFeeds:
        """Feeds with a logged pool (an exploring variant, no fallback) from exposure rows
        (``read_exposures``), optionally of one ``variant``. Raises if there are none."""
        rows = exposures[exposures["pool"].map(lambda p: p is not None and len(p) > 0)]
        rows = rows[~rows["fallback"].astype(bool)]
        if variant is not None:
            rows = rows[rows["variant"] == variant]
        if rows.empty:
            arm = f" of variant {variant!r}" if variant is not None else ""
            raise ValueError(
                f"no explored feeds{arm} in the exposure log: off-policy evaluation needs a "
                "variant with exploration.epsilon > 0"
            )
        rows = rows.sort_values(["request_id", "position"], kind="stable")
        rows = rows.assign(_reward=rows[list(reward)].to_numpy(np.float64).sum(axis=1))
        feeds = rows.groupby("request_id", sort=True)
        first = feeds.first()
        return cls(
            request_id=first.index.to_numpy(),
            variant=first["variant"].to_numpy(),
            user_id=first["user_id"].to_numpy(np.int64),
            ts=first["ts"].to_numpy(np.float64),
            posts=[g.to_numpy(np.int64) for _, g in feeds["post_id"]],
            propensity=[g.to_numpy(np.float64) for _, g in feeds["propensity"]],
            reward=[g.to_numpy(np.float64) for _, g in feeds["_reward"]],
            pool=[np.asarray(p, np.int64) for p in first["pool"]],
            explored=first["explored"].to_numpy(bool),
        )


#: A policy to evaluate: the logged feeds -> per feed the posts it would show, slot by slot.
TargetPolicy = Callable[[LoggedFeeds], list[np.ndarray]]


def greedy_policy(logged: LoggedFeeds) -> list[np.ndarray]:
    """The logging chain without its exploration: each pool's first ``K_i`` posts."""
    return [pool[: len(posts)] for pool, posts in zip(logged.pool, logged.posts, strict=True)]


@dataclass(frozen=True)
class PolicyValue:
    """One target policy's estimated value per feed.

    match_rate: share of logged slots where the target shows the logged post; ess: effective
    sample size of the slot weights; max_weight: the largest ``1 / mu`` used;
    rewarded_matches: matched slots with a reward, the terms the estimate rests on; truth: the
    ground truth's value (simulated traffic only)."""

    name: str
    ips: Estimate
    snips: Estimate
    match_rate: float
    ess: float
    max_weight: float
    rewarded_matches: int
    truth: float | None = None

    @property
    def interval_reliable(self) -> bool:
        """Whether enough rewarded matches back the intervals (``MIN_REWARDED_MATCHES``)."""
        return self.rewarded_matches >= MIN_REWARDED_MATCHES

    def truth_covered(self, z: float = Z95) -> bool | None:
        """Whether the IPS interval (``z`` standard errors) holds the truth."""
        if self.truth is None:
            return None
        return abs(self.ips.value - self.truth) <= z * self.ips.se

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ips"]["ci"], out["snips"]["ci"] = self.ips.ci, self.snips.ci
        out["interval_reliable"] = self.interval_reliable
        return out


def _per_user(users: np.ndarray, *columns: np.ndarray) -> list[np.ndarray]:
    """Sum each [N] column per user -> [U] each (users in sorted order)."""
    _, inverse = np.unique(users, return_inverse=True)
    return [np.bincount(inverse, weights=c) for c in columns]


def _padded(rows: Sequence[np.ndarray], width: int, fill: float, dtype: type) -> np.ndarray:
    """Ragged rows -> [len(rows), width], cut or padded with ``fill``."""
    out: np.ndarray = np.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        row = np.asarray(row)[:width]
        out[i, : len(row)] = row
    return out


def evaluate_policy(name: str, logged: LoggedFeeds, lists: list[np.ndarray]) -> PolicyValue:
    """IPS and SNIPS of the target's ``lists`` (per feed, its posts slot by slot; only the
    first ``K_i`` count). Raises if the target shows a post its feed's pool did not hold: the
    logging policy could never have shown it there, so no estimate exists."""
    if len(lists) != len(logged):
        raise ValueError(f"target {name}: {len(lists)} lists for {len(logged)} feeds")
    k_max = max(len(p) for p in logged.posts)
    m_max = max(len(p) for p in logged.pool)
    posts = _padded(logged.posts, k_max, -1, np.int64)
    mu = _padded(logged.propensity, k_max, 1.0, np.float64)
    reward = _padded(logged.reward, k_max, 0.0, np.float64)
    slots = posts >= 0  # [N, K] the feed has this slot
    shown = np.where(slots, _padded(lists, k_max, -1, np.int64), -1)
    pool = _padded(logged.pool, m_max, -2, np.int64)  # -2: never equal to a padded slot
    in_pool = (shown[:, :, None] == pool[:, None, :]).any(axis=2)
    unsupported = int((slots & (shown >= 0) & ~in_pool).sum())
    if unsupported:
        raise ValueError(
            f"target {name}: {unsupported} of its slots show posts outside their feed's pool "
            "(probability 0 under the logging policy): not evaluable from this log"
        )
    w = np.where(slots & (shown == posts), 1.0 / mu, 0.0)  # [N, K]
    weighted = (w * reward).sum(axis=1)  # sum_k w_ik r_ik
    normaliser = w.sum(axis=1) / slots.sum(axis=1)  # c_i
    y, c, n = _per_user(logged.user_id, weighted, normaliser, np.ones(len(logged)))
    flat = w[slots]
    matched = flat[flat > 0]
    return PolicyValue(
        name=name,
        ips=ratio_estimate(y, n),
        snips=ratio_estimate(y, c),
        match_rate=float(len(matched) / len(flat)),
        ess=float(flat.sum() ** 2 / max(float((flat**2).sum()), 1e-300)),
        max_weight=float(matched.max(initial=0.0)),
        rewarded_matches=int(((w > 0) & (reward > 0)).sum()),
    )


def logged_value(logged: LoggedFeeds) -> Estimate:
    """The logging policy's own value per feed (the observed rewards), same statistics."""
    rewards = np.asarray([r.sum() for r in logged.reward])
    y, n = _per_user(logged.user_id, rewards, np.ones(len(logged)))
    return ratio_estimate(y, n)


def ranker_policy(
    ranker_dir: Path, store: OnlineFeatureStore, rules: RerankConfig | None = None
) -> TargetPolicy:
    """The chain with another ranker: the ranker artifact at ``ranker_dir`` scores each feed's
    pool with the serving day's features (the online store's, through the shared transform),
    and the service's re-ranking rules order it. Real-time interest boosts are left out: the
    target is judged on what its ranker knows."""
    from feedrec.artifacts import load_artifact
    from feedrec.features.transform import FeatureTransform
    from feedrec.models.predictor import RankerPredictor

    artifact = load_artifact(Path(ranker_dir))
    transform = FeatureTransform(artifact.vocabs)
    predictor = RankerPredictor.from_artifact(artifact)
    rules = rules or RerankConfig()

    def lists(logged: LoggedFeeds) -> list[np.ndarray]:
        if not len(logged.pool):
            return []
        sizes = np.array([len(pool) for pool in logged.pool])
        # Every feed's pool in one lookup and one predictor pass, then re-ranked feed by feed.
        viewers = store.users(logged.user_id.tolist())
        users = [viewer for viewer, size in zip(viewers, sizes, strict=True) for _ in range(size)]
        raw = store.ranker_raw(users, np.concatenate(logged.pool).astype(np.int64))
        predictions = np.split(predictor.predict(transform(raw, "ranker")), np.cumsum(sizes)[:-1])
        out = []
        for pool, posts, scored in zip(logged.pool, logged.posts, predictions, strict=True):
            chosen = rerank(store.candidates(pool, scored), len(posts), rules)
            out.append(pool[chosen.index])
        return out

    return lists


@dataclass(frozen=True)
class SimulatedContexts:
    """Where each simulated feed sat: first_slot (session slot of its first post), page and
    ts (world time), int64/int64/float64 [N]; fatigue: the users' per-page damping."""

    first_slot: np.ndarray
    page: np.ndarray
    ts: np.ndarray
    fatigue: float

    @classmethod
    def of(cls, logged: LoggedFeeds, truth: pd.DataFrame, fatigue: float) -> SimulatedContexts:
        """From the simulation's ``truth.parquet`` rows; every feed must be in it."""
        rows = truth.assign(first_slot=truth["session_position"] - truth["position"])
        rows = rows.drop_duplicates("request_id").set_index("request_id")
        missing = ~pd.Index(logged.request_id).isin(rows.index)
        if missing.any():
            raise ValueError(f"{int(missing.sum())} feeds are not in the simulation's truth")
        rows = rows.loc[logged.request_id]
        return cls(
            rows["first_slot"].to_numpy(np.int64),
            rows["page"].to_numpy(np.int64),
            rows["ts"].to_numpy(np.float64),
            fatigue,
        )


def true_values(
    world: GroundTruth,
    logged: LoggedFeeds,
    lists: list[np.ndarray],
    contexts: SimulatedContexts,
    reward: Sequence[str] = ENGAGEMENTS,
) -> np.ndarray:
    """float [N]: the expected reward of each feed had it shown the target's list, in the
    feed's own context (the world's ground truth; simulated traffic only)."""
    out = np.zeros(len(logged))
    for i, (target, posts) in enumerate(zip(lists, logged.posts, strict=True)):
        shown = np.asarray(target, np.int64)[: len(posts)]
        expected = expected_outcomes(
            world,
            np.full(len(shown), logged.user_id[i]),
            shown,
            contexts.ts[i],
            contexts.first_slot[i] + np.arange(len(shown)),
            contexts.page[i],
            contexts.fatigue,
        )
        out[i] = sum(float(expected[task].sum()) for task in reward)
    return out


def replicate_errors(
    world: GroundTruth,
    logged: LoggedFeeds,
    contexts: SimulatedContexts,
    targets: dict[str, list[np.ndarray]],
    exploration: Exploration,
    *,
    runs: int = 10_000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """How far each estimate falls from its truth, in its own standard errors, when the same
    feeds (pools, viewers, contexts) are logged again and again by exact exploration and the
    simulated users react with the world's probabilities: per target in ``targets`` (per feed
    its list, as for :func:`evaluate_policy`) and ``"logging"`` (the observed value against
    the world's value of what was drawn), ``(estimate - truth) / se``, float64 [runs]
    (+-inf where a run's se is 0).

    Why: with heavy weights (``1 / mu`` of 30 on explored slots) the delta-method interval is
    skewed: when few heavily weighted rewards happen to be logged, estimate and se are both
    low and the error is many se below the truth. This is the reference distribution a live
    run's errors are judged against (simulated traffic only): a live log whose propensities
    or rewards were wrong would fall outside it."""
    n = len(logged)
    k_max = max(len(p) for p in logged.posts)
    m_max = max(len(p) for p in logged.pool)
    tasks = ("view", *ENGAGEMENTS)
    # expected[i, j, k, t]: p(task t) had pool post j been shown in slot k of feed i
    expected = np.zeros((n, m_max, k_max, len(tasks)))
    for i in range(n):
        pool, k = logged.pool[i], len(logged.posts[i])
        grid = expected_outcomes(
            world,
            np.full(len(pool) * k, logged.user_id[i]),
            np.repeat(pool, k),
            contexts.ts[i],
            np.tile(contexts.first_slot[i] + np.arange(k), len(pool)),
            contexts.page[i],
            contexts.fatigue,
        )
        for t, task in enumerate(tasks):
            expected[i, : len(pool), :k, t] = grid[task].reshape(len(pool), k)
    sizes = np.array([len(p) for p in logged.pool])
    slots = np.arange(k_max)[None, :] < np.array([len(p) for p in logged.posts])[:, None]
    rows = np.arange(n)[:, None]
    reward_e = expected[..., 1:].sum(axis=3)  # [n, M, K] expected reward
    _, users = np.unique(logged.user_id, return_inverse=True)
    feeds_per_user = np.bincount(users).astype(np.float64)

    def estimate(per_feed: np.ndarray) -> tuple[float, float]:
        e = ratio_estimate(np.bincount(users, weights=per_feed), feeds_per_user)
        return e.value, e.se

    chosen: dict[str, np.ndarray] = {}  # per target [n, K] pool positions; -1 off the feed
    truth: dict[str, float] = {}
    for name, lists in targets.items():
        index = np.full((n, k_max), -1, np.int64)
        for i, (pool, shown) in enumerate(zip(logged.pool, lists, strict=True)):
            where = {int(post): j for j, post in enumerate(pool)}
            for k, post in enumerate(np.asarray(shown)[: len(logged.posts[i])]):
                index[i, k] = where[int(post)]
        chosen[name] = index
        truth[name] = float(
            np.where(slots, reward_e[rows, index.clip(0), np.arange(k_max)], 0.0).sum() / n
        )

    rng = np.random.default_rng(seed)
    out = {name: np.empty(runs) for name in ["logging", *targets]}
    for run in range(runs):
        keys = rng.random((n, m_max))
        keys[np.arange(m_max)[None, :] >= sizes[:, None]] = np.inf  # padding is never drawn
        explored = rng.random(n) < exploration.epsilon
        drawn = np.where(explored[:, None], np.argsort(keys, axis=1)[:, :k_max], np.arange(k_max))
        p = expected[rows, drawn, np.arange(k_max)]  # [n, K, tasks]
        view = rng.random((n, k_max)) < p[..., 0]
        # p(task | view) = p(task) / p(view), each task drawn on its own, as the users do
        hits = view[..., None] & (
            rng.random((n, k_max, len(ENGAGEMENTS))) * p[..., :1] < p[..., 1:]
        )
        reward = np.where(slots, hits.sum(axis=2), 0).astype(np.float64)
        mu = (1.0 - exploration.epsilon) * (drawn == np.arange(k_max)) + (
            exploration.epsilon / sizes[:, None]
        )
        value, se = estimate(reward.sum(axis=1))
        served = np.where(slots, p[..., 1:].sum(axis=2), 0.0).sum() / n
        out["logging"][run] = in_se(value - served, se)
        for name, index in chosen.items():
            w = np.where(slots & (drawn == index), 1.0 / mu, 0.0)
            value, se = estimate((w * reward).sum(axis=1))
            out[name][run] = in_se(value - truth[name], se)
    return out


def in_se(error: float, se: float) -> float:
    """An estimate's ``error`` in its standard errors (+-inf for a nonzero error at se 0)."""
    if se > 0:
        return error / se
    return 0.0 if error == 0 else math.copysign(math.inf, error)


@dataclass(frozen=True)
class OffPolicyReport:
    """Every target's value next to the logging policy's, on the same feeds.

    logging: the observed value per feed of the exploring variant; logging_truth: what the
    world expected of the feeds it actually served (simulated traffic only); explored: share
    of feeds drawn at random; users, feeds: the sample."""

    variant: str
    feeds: int
    users: int
    explored: float
    logging: Estimate
    logging_truth: float | None
    policies: list[PolicyValue]
    reward: tuple[str, ...] = ENGAGEMENTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "feeds": self.feeds,
            "users": self.users,
            "explored": self.explored,
            "reward": list(self.reward),
            "logging": {**asdict(self.logging), "ci": self.logging.ci},
            "logging_truth": self.logging_truth,
            "policies": [p.to_dict() for p in self.policies],
        }


def analyse(
    logged: LoggedFeeds,
    targets: dict[str, TargetPolicy],
    *,
    world: GroundTruth | None = None,
    contexts: SimulatedContexts | None = None,
    served_truth: np.ndarray | None = None,
) -> OffPolicyReport:
    """Evaluate each target on ``logged``; with the world and the simulated contexts, each
    gets its ground truth. ``served_truth``: [N] the world's expected reward of the feeds as
    served (from the simulation's truth), for the logging row."""
    policies = []
    for name, policy in targets.items():
        lists = policy(logged)
        value = evaluate_policy(name, logged, lists)
        if world is not None and contexts is not None:
            truth = float(true_values(world, logged, lists, contexts).mean())
            value = PolicyValue(**{**value.__dict__, "truth": truth})
        policies.append(value)
    variants = sorted(set(logged.variant.tolist()))
    return OffPolicyReport(
        variant=",".join(variants),
        feeds=len(logged),
        users=len(np.unique(logged.user_id)),
        explored=float(logged.explored.mean()),
        logging=logged_value(logged),
        logging_truth=float(served_truth.mean()) if served_truth is not None else None,
        policies=policies,
    )


def write_report(report: OffPolicyReport, out_dir: Path) -> Path:
    """``ope.md``, ``ope.json`` and ``ope.png`` (each policy's IPS and SNIPS with 95 % CIs,
    and the ground truth where known) in ``out_dir``; returns the markdown's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ope.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _plot(report, out_dir / "ope.png")

    def ci(e: Estimate) -> str:
        lo, hi = e.ci
        return f"{e.value:.4f} [{lo:.4f}, {hi:.4f}]"

    def truth(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lines = [
        "# Off-policy evaluation",
        "",
        f"Logging variant `{report.variant}`: {report.feeds} feeds of {report.users} users, "
        f"{report.explored:.1%} explored. Value = expected {' + '.join(report.reward)} per feed. "
        "Item-position IPS and SNIPS, 95 % intervals (delta method over users).",
        "",
        "| policy | IPS | SNIPS | ground truth | slots matched | rewarded matches | ESS | "
        "max weight |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| logging (observed) | {ci(report.logging)} | | {truth(report.logging_truth)} | "
        "100% | | | 1 |",
    ]
    for p in report.policies:
        flag = "" if p.interval_reliable else " (!)"
        lines.append(
            f"| {p.name}{flag} | {ci(p.ips)} | {ci(p.snips)} | {truth(p.truth)} | "
            f"{p.match_rate:.1%} | {p.rewarded_matches} | {p.ess:.0f} | {p.max_weight:.1f} |"
        )
    if not all(p.interval_reliable for p in report.policies):
        lines += [
            "",
            f"(!) fewer than {MIN_REWARDED_MATCHES} rewarded slots agree with the log: the "
            "interval rests on a handful of terms and is not to be trusted. Log more exploring "
            "feeds before reading it.",
        ]
    lines += ["", "![values](ope.png)", ""]
    path = out_dir / "ope.md"
    path.write_text("\n".join(lines))
    return path


def _plot(report: OffPolicyReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["logging"] + [p.name for p in report.policies]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 3.6))
    x = np.arange(len(names))
    ips = [report.logging] + [p.ips for p in report.policies]
    snips = [report.logging] + [p.snips for p in report.policies]
    for offset, estimates, label in ((-0.1, ips, "IPS"), (0.1, snips, "SNIPS")):
        ax.errorbar(
            x + offset,
            [e.value for e in estimates],
            yerr=[Z95 * e.se for e in estimates],
            fmt="o",
            capsize=4,
            label=f"{label} (95% CI)",
        )
    truths = [report.logging_truth] + [p.truth for p in report.policies]
    known = [(i, t) for i, t in enumerate(truths) if t is not None]
    if known:
        ax.plot(*zip(*known, strict=True), "r*", markersize=11, label="ground truth")
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel(f"{' + '.join(report.reward)} per feed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_exposures(
    exposures: pd.DataFrame,
    *,
    world_dir: Path,
    data_dir: Path,
    candidates: dict[str, Path],
    rules: RerankConfig | None = None,
    variant: str | None = None,
    simulation_dir: Path | None = None,
) -> OffPolicyReport:
    """The whole evaluation: the explored feeds of ``exposures`` (``variant``'s, or every
    exploring variant's), the logging chain without exploration (``greedy``) and each
    candidate ranker artifact as targets (scored with the features of ``data_dir`` for the
    world at ``world_dir``, re-ranked by ``rules``). With ``simulation_dir`` (a simulation's
    ``truth.parquet`` + ``simulation.json``), only its feeds, each target with its ground truth."""
    from feedrec.experiments.user_simulator import SIMULATION_FILE, TRUTH_FILE
    from feedrec.world.generator import truth_for_day
    from feedrec.world.layout import WorldLayout

    logged = LoggedFeeds.from_exposures(exposures, variant)
    store = OnlineFeatureStore.load(data_dir, world_dir)
    targets: dict[str, TargetPolicy] = {"greedy": greedy_policy}
    for name, path in candidates.items():
        targets[name] = ranker_policy(path, store, rules)
    if simulation_dir is None:
        return analyse(logged, targets)
    truth = pd.read_parquet(Path(simulation_dir) / TRUTH_FILE)
    behaviour = json.loads((Path(simulation_dir) / SIMULATION_FILE).read_text())
    logged = logged.subset(pd.Index(logged.request_id).isin(truth["request_id"]))
    if not len(logged):
        raise ValueError(f"none of the explored feeds is in {simulation_dir}/{TRUTH_FILE}")
    contexts = SimulatedContexts.of(logged, truth, float(behaviour["fatigue"]))
    served = truth.assign(e=truth[[f"e_{t}" for t in ENGAGEMENTS]].sum(axis=1))
    served_truth = served.groupby("request_id")["e"].sum().loc[logged.request_id].to_numpy()
    world = truth_for_day(WorldLayout(Path(world_dir)), int(behaviour["serving_day"]))
    return analyse(logged, targets, world=world, contexts=contexts, served_truth=served_truth)
