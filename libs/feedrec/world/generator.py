"""Generate a synthetic feed world: entities, follow graph and day-partitioned impression logs.

:func:`generate_world` writes days ``0 .. n_days-1``; :func:`append_days` simulates more days after
the last one with the users' topic interests drifted (a distribution shift to monitor, see
``feedrec.monitoring.drift``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from feedrec.schema.registry import CONTENT_DIM
from feedrec.world.config import WorldConfig, eligible_posts
from feedrec.world.layout import WorldLayout
from feedrec.world.truth import (
    BINARY_TASKS,
    DWELL_SIGMA,
    LATENT_DIM,
    MEDIA_VIDEO,
    N_MEDIA,
    N_SEGMENTS,
    GroundTruth,
)

# How strongly the logging policy follows its (noisy) view of the user's interests and of creator
# popularity. It is deliberately imperfect so that a learned ranker has something to improve on.
POLICY_INTEREST_WEIGHT = 1.0
POLICY_INTEREST_NOISE = 1.0
POLICY_POPULARITY_WEIGHT = 0.3
POLICY_FRESHNESS_WEIGHT = 0.3
#: Dirichlet concentration of a user's topic interests (< 1: each user likes a few topics).
INTEREST_CONCENTRATION = 0.3
#: Dirichlet concentration of the topic "trend" of a drift (:func:`drift_interests`); < 1: a few
#: topics take most of the new interest, as when attention moves to a trending subject.
TREND_CONCENTRATION = 0.5
#: Record of the days :func:`append_days` added, next to ``world.json``.
APPENDED_FILE = "appended.json"


def _entities(
    cfg: WorldConfig, rng: np.random.Generator
) -> tuple[GroundTruth, dict[str, np.ndarray]]:
    t, u, c, p = cfg.n_topics, cfg.n_users, cfg.n_creators, cfg.n_posts
    theta = rng.dirichlet(np.full(t, INTEREST_CONCENTRATION), size=u).astype(np.float32)
    z_user = rng.standard_normal((u, LATENT_DIM), dtype=np.float32)
    segment = rng.integers(0, N_SEGMENTS, size=u)
    activity = rng.lognormal(0.0, 0.8, size=u)
    signup_day = np.where(
        rng.random(u) < cfg.new_user_frac, rng.integers(1, cfg.n_days, size=u), 0
    ).astype(np.int64)

    quality = rng.normal(0.0, 0.5, size=c).astype(np.float32)
    main_topic = rng.integers(0, t, size=c)
    creator_activity = rng.lognormal(0.0, 1.0, size=c)

    # Every creator has at least one post; the rest follow creator activity.
    creator = np.concatenate(
        [np.arange(c), rng.choice(c, size=p - c, p=creator_activity / creator_activity.sum())]
    )
    rng.shuffle(creator)
    topic = np.where(rng.random(p) < 0.75, main_topic[creator], rng.integers(0, t, size=p))
    media = rng.choice(N_MEDIA, size=p, p=[0.5, 0.3, 0.2])
    created_at = rng.uniform(-cfg.post_lifetime_days, cfg.n_days, size=p)
    z_post = rng.standard_normal((p, LATENT_DIM), dtype=np.float32)
    media_pref = rng.normal(0.0, 1.0, size=(N_SEGMENTS, N_MEDIA)).astype(np.float32)

    # Content embedding: topic centroid + a projection of the latent taste + noise, unit norm.
    centroids = rng.standard_normal((t, CONTENT_DIM), dtype=np.float32)
    proj = rng.standard_normal((LATENT_DIM, CONTENT_DIM), dtype=np.float32) / np.sqrt(LATENT_DIM)
    noise = rng.standard_normal((p, CONTENT_DIM), dtype=np.float32)
    content = centroids[topic] + 0.7 * z_post @ proj + 0.5 * noise
    content /= np.linalg.norm(content, axis=1, keepdims=True)

    truth = GroundTruth(
        theta=theta,
        z_user=z_user,
        segment=segment,
        z_post=z_post,
        topic=topic,
        media=media,
        creator=creator,
        created_at=created_at,
        quality=quality,
        media_pref=media_pref,
    )
    extra = {
        "activity": activity,
        "signup_day": signup_day,
        "main_topic": main_topic,
        "creator_activity": creator_activity,
        "content": content.astype(np.float32),
    }
    return truth, extra


#: Follows whose topic draws are computed at once in :func:`_follows`.
_FOLLOW_SLICE = 1_000_000


def _follows(
    cfg: WorldConfig, rng: np.random.Generator, truth: GroundTruth, main_topic: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Follows: a topic drawn from the user's interests, then a creator of it by quality."""
    n_follow = rng.poisson(cfg.follows_per_user, size=cfg.n_users)
    users = np.repeat(np.arange(cfg.n_users), n_follow)
    draw = rng.random((len(users), 1))
    topics = np.empty(len(users), dtype=np.int64)
    # In slices of follows: [follows, topics] cumulative interests for all of them at once
    # would be 12 GB at 6M users.
    for a in range(0, len(users), _FOLLOW_SLICE):
        cum_theta = np.cumsum(truth.theta[users[a : a + _FOLLOW_SLICE]], axis=1)
        chosen = cum_theta < draw[a : a + _FOLLOW_SLICE] * cum_theta[:, -1:]
        topics[a : a + _FOLLOW_SLICE] = chosen.sum(axis=1)
    topics = np.minimum(topics, cfg.n_topics - 1)
    order = np.argsort(main_topic, kind="stable")
    weights = np.exp(truth.quality[order]).astype(np.float64)
    cum = np.cumsum(weights)
    start = np.searchsorted(main_topic[order], np.arange(cfg.n_topics), side="left")
    end = np.searchsorted(main_topic[order], np.arange(cfg.n_topics), side="right")
    has = end[topics] > start[topics]
    users, topics = users[has], topics[has]
    lo = np.where(start[topics] > 0, cum[np.maximum(start[topics] - 1, 0)], 0.0)
    hi = cum[end[topics] - 1]
    picked = np.searchsorted(cum, lo + rng.random(len(users)) * (hi - lo), side="right")
    creators = order[np.minimum(picked, end[topics] - 1)]
    keys = np.unique(users.astype(np.int64) * cfg.n_creators + creators)
    return keys // cfg.n_creators, keys % cfg.n_creators


def write_table(
    path: Path, columns: dict[str, np.ndarray], schema: pa.Schema | None = None
) -> None:
    """Write numpy columns as one Parquet file; 2-d arrays become fixed-size lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name, col in columns.items():
        if col.ndim == 2:
            flat = pa.array(col.reshape(-1))
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, col.shape[1])
        else:
            arrays[name] = pa.array(col)
    table = pa.table(arrays)
    pq.write_table(table.cast(schema) if schema is not None else table, path)


def _simulate_day(
    day: int,
    cfg: WorldConfig,
    rng: np.random.Generator,
    truth: GroundTruth,
    extra: dict[str, np.ndarray],
    follow_keys: np.ndarray,
    followers: np.ndarray,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One day of sessions under the logging policy. Returns (log columns, truth columns).

    The day is not a column: it is the hive partition (``logs/day=D/``) the files are written to.
    """
    eligible = eligible_posts(truth.created_at, day, cfg.post_lifetime_days)
    active = np.flatnonzero(extra["signup_day"] <= day)
    weights = extra["activity"][active]
    n_sess = cfg.sessions_per_day
    users = active[rng.choice(len(active), size=n_sess, p=weights / weights.sum())]
    ts = day + np.sort(rng.random(n_sess))

    pool_size = min(cfg.pool_size, len(eligible))
    pool = eligible[rng.integers(0, len(eligible), size=(n_sess, pool_size))]
    keys = users[:, None].astype(np.int64) * cfg.n_creators + truth.creator[pool]
    idx = np.minimum(np.searchsorted(follow_keys, keys), max(len(follow_keys) - 1, 0))
    followed = (follow_keys[idx] == keys) if len(follow_keys) else np.zeros_like(keys, bool)

    noisy_interest = np.log(truth.theta[users[:, None], truth.topic[pool]] + 0.02)
    noisy_interest += rng.normal(0.0, POLICY_INTEREST_NOISE, size=pool.shape)
    age = ts[:, None] - truth.created_at[pool]
    score = (
        POLICY_INTEREST_WEIGHT * noisy_interest
        + POLICY_POPULARITY_WEIGHT * np.log1p(followers[truth.creator[pool]])
        - POLICY_FRESHNESS_WEIGHT * age
    )
    score = np.where(followed, -np.inf, score)
    logp = score - score.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    # Gumbel top-k = sampling session_len posts without replacement from softmax(score).
    gumbel = logp - np.log(-np.log(rng.random(pool.shape)))
    top = np.argsort(-gumbel, axis=1)[:, : cfg.session_len]
    rows = np.arange(n_sess)[:, None]
    posts = pool[rows, top]
    # Probability that this post is the policy's draw for a slot: pool inclusion x softmax share.
    propensity = np.exp(logp[rows, top]) * pool_size / len(eligible)
    keep = np.isfinite(logp[rows, top])  # never log a followed creator's post as a suggestion

    position = np.broadcast_to(np.arange(cfg.session_len), posts.shape)
    u, p = np.broadcast_to(users[:, None], posts.shape)[keep], posts[keep]
    t = np.broadcast_to(ts[:, None], posts.shape)[keep]
    pos = position[keep]
    prob = truth.probabilities(u, p, t, pos)
    view = rng.random(len(u)) < prob["view"]
    labels: dict[str, np.ndarray] = {"view": view.astype(np.int8)}
    for task in BINARY_TASKS:
        labels[task] = (view & (rng.random(len(u)) * prob["view"] < prob[task])).astype(np.int8)
    is_video = (truth.media[p] == MEDIA_VIDEO).astype(np.float64)
    mu = GroundTruth.dwell_mu(truth.affinity(u, p), is_video)
    dwell = np.where(view, rng.lognormal(mu, DWELL_SIGMA), 0.0).astype(np.float32)

    first_id = day * cfg.sessions_per_day * cfg.session_len
    impression_id = first_id + np.flatnonzero(keep.reshape(-1)).astype(np.int64)
    logs = {
        "impression_id": impression_id,
        "ts": t.astype(np.float64),
        "user_id": u.astype(np.int64),
        "post_id": p.astype(np.int64),
        "position": pos.astype(np.int64),
        "propensity": propensity[keep].astype(np.float32),
        **labels,
        "dwell": dwell,
    }
    truth_cols = {"impression_id": impression_id}
    truth_cols.update({f"p_{k}": v.astype(np.float32) for k, v in prob.items() if k != "dwell"})
    truth_cols["e_dwell"] = prob["dwell"].astype(np.float32)
    return logs, truth_cols


def generate_world(cfg: WorldConfig, out_dir: Path, *, progress: bool = True) -> WorldLayout:
    """Write a world to ``out_dir`` (see :class:`WorldLayout`). Deterministic given ``cfg``."""
    layout = WorldLayout(Path(out_dir))
    rng = np.random.default_rng(cfg.seed)
    truth, extra = _entities(cfg, rng)
    f_users, f_creators = _follows(cfg, rng, truth, extra["main_topic"])
    follow_keys = f_users * cfg.n_creators + f_creators  # sorted by construction
    followers = np.bincount(f_creators, minlength=cfg.n_creators).astype(np.float32)

    write_table(
        layout.users,
        {
            "user_id": np.arange(cfg.n_users, dtype=np.int64),
            "user_segment": truth.segment.astype(np.int64),
            "signup_day": extra["signup_day"],
        },
    )
    write_table(
        layout.posts,
        {
            "post_id": np.arange(cfg.n_posts, dtype=np.int64),
            "creator_id": truth.creator.astype(np.int64),
            "topic": truth.topic.astype(np.int64),
            "media_type": truth.media.astype(np.int64),
            "created_at": truth.created_at.astype(np.float64),
            "content_emb": extra["content"],
        },
    )
    write_table(
        layout.creators,
        {"creator_id": np.arange(cfg.n_creators, dtype=np.int64), "followers": followers},
    )
    write_table(layout.follows, {"user_id": f_users, "creator_id": f_creators})
    truth.save(layout.latent)

    for day in tqdm(range(cfg.n_days), desc="generate days", disable=not progress):
        logs, truth_cols = _simulate_day(day, cfg, rng, truth, extra, follow_keys, followers)
        write_table(layout.log_day(day) / "part-0.parquet", logs)
        write_table(layout.truth_impressions / f"day={day}" / "part-0.parquet", truth_cols)
    layout.config.write_text(json.dumps(cfg.to_dict(), indent=2))
    return layout


def load_world_config(layout: WorldLayout) -> WorldConfig:
    """The config a world was generated with."""
    return WorldConfig(**json.loads(layout.config.read_text()))


def drift_interests(theta: np.ndarray, drift: float, rng: np.random.Generator) -> np.ndarray:
    """Users' topic interests after a shift: float32 [U, T] -> [U, T], rows summing to 1.

    Each row becomes ``(1 - drift) * theta + drift * fresh``. The fresh draws share one random
    "trend" (which topics are in fashion): a Dirichlet over the users with the original total
    concentration, spread over the topics by a Dirichlet(``TREND_CONCENTRATION``) weight. Without
    the trend the fresh interests would average out over the users and the population's topic
    mix would not move. ``drift=0`` returns ``theta`` unchanged (the same rng draws are made
    either way).
    """
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"drift must be in [0, 1], got {drift}")
    n_users, n_topics = theta.shape
    trend = rng.dirichlet(np.full(n_topics, TREND_CONCENTRATION))
    # A floor on alpha: Dirichlet sampling of a near-zero concentration underflows to NaN rows.
    alpha = np.maximum(INTEREST_CONCENTRATION * n_topics * trend, 1e-3)
    fresh = rng.dirichlet(alpha, size=n_users)
    if drift == 0.0:
        return theta.astype(np.float32, copy=True)
    mixed = (1.0 - drift) * theta.astype(np.float64) + drift * fresh
    return (mixed / mixed.sum(axis=1, keepdims=True)).astype(np.float32)


def latent_epoch(layout: WorldLayout, first_day: int) -> Path:
    """Where :func:`append_days` keeps the ground truth in effect from ``first_day`` on."""
    return layout.truth / f"latent_from_day={first_day}.npz"


def truth_for_day(layout: WorldLayout, day: int) -> GroundTruth:
    """The ground truth that generated ``day``'s impressions.

    A world :func:`append_days` never touched has one truth (``truth/latent.npz``). After an
    append, ``latent.npz`` holds the latest truth and ``latent_from_day=D.npz`` the one in effect
    from day D on (D = 0 for the original days, then each append's first day).
    """
    epochs = sorted(
        (int(p.stem.split("=")[1]), p) for p in layout.truth.glob("latent_from_day=*.npz")
    )
    if not epochs:
        return GroundTruth.load(layout.latent)
    path = [p for first, p in epochs if first <= day][-1]
    return GroundTruth.load(path)


def read_appended(layout: WorldLayout) -> dict[str, Any]:
    """``{"base_n_days": days generate_world wrote, "appends": [{first_day, n_days, drift,
    seed}, ...]}``; a world without appended days has an empty list."""
    path = layout.root / APPENDED_FILE
    if path.exists():
        return dict(json.loads(path.read_text()))
    return {"base_n_days": load_world_config(layout).n_days, "appends": []}


def append_days(
    world_dir: Path, n_days: int = 1, drift: float = 0.5, seed: int = 0, *, progress: bool = False
) -> WorldLayout:
    """Simulate ``n_days`` more days after the world's last day, with drifted topic interests.

    Every user's interests are shifted once (:func:`drift_interests`); the new days follow the
    shifted truth, sessions drawn by the same logging policy and engagement model as the original
    days. The new logs and per-impression truth go to ``logs/day=D/`` and
    ``truth/impressions/day=D/``; ``world.json``'s ``n_days`` grows, so ``preprocess`` picks them
    up (with the default split, the last appended day becomes the test day).

    Ground truth: the per-impression probabilities of every day stay exact. ``truth/latent.npz``
    becomes the shifted truth (what evaluation of the new test day needs); the truth of each
    period is kept as ``latent_from_day=D.npz`` (:func:`truth_for_day`). ``appended.json``
    records the appends.

    No post is created after the original days: the eligible posts of day D are those created in
    ``[D - post_lifetime_days, D)``, so each appended day after the first sees fewer and older
    posts (a second, age-related shift); past ``post_lifetime_days`` appended days, none.

    Args:
        world_dir: a generated world (imported logs have no ground truth to continue from).
        n_days: days to add (>= 1).
        drift: share of each user's interests replaced by a fresh draw, in [0, 1]; 0 keeps the
            interests, so the new days follow the original distribution.
        seed: with the world's seed and first new day, seeds the new days (deterministic).
    """
    if n_days < 1:
        raise ValueError(f"append_days: n_days must be >= 1, got {n_days}")
    if seed < 0:
        raise ValueError(f"append_days: seed must be >= 0, got {seed}")
    if not 0.0 <= drift <= 1.0:
        raise ValueError(f"append_days: drift must be in [0, 1], got {drift}")
    layout = WorldLayout(Path(world_dir))
    if not layout.config.exists():
        raise FileNotFoundError(f"no world in {layout.root} (world.json missing)")
    open_day = load_world_config(layout).n_days
    if any(layout.log_day(open_day).glob("*.parquet")):
        raise ValueError(
            f"append_days: day {open_day} already has logs (live traffic the event sink "
            "wrote?); close that day first (`feedrec events sink --close-day`)"
        )
    if not layout.has_truth or layout.source.exists():
        raise ValueError(f"append_days: {layout.root} has no ground truth (imported logs?)")
    cfg = load_world_config(layout)
    record = read_appended(layout)
    first_day = cfg.n_days

    # The activity weights were never written: regenerate the entities (a deterministic function
    # of the original config) and check that they are the ones on disk.
    base_cfg = cfg.with_overrides(n_days=record["base_n_days"])
    regenerated, extra = _entities(base_cfg, np.random.default_rng(base_cfg.seed))
    truth = GroundTruth.load(layout.latent)
    if not (
        np.array_equal(regenerated.topic, truth.topic)
        and np.array_equal(regenerated.created_at, truth.created_at)
    ):
        raise ValueError(
            f"append_days: the generator no longer reproduces the entities of {layout.root}"
        )
    follows = pq.read_table(layout.follows)
    follow_keys = np.sort(
        follows.column("user_id").to_numpy().astype(np.int64) * cfg.n_creators
        + follows.column("creator_id").to_numpy()
    )
    followers = pq.read_table(layout.creators).column("followers").to_numpy().astype(np.float32)

    days = range(first_day, first_day + n_days)
    if len(eligible_posts(truth.created_at, days[-1], cfg.post_lifetime_days)) == 0:
        raise ValueError(
            f"append_days: no post is eligible on day {days[-1]} (posts are only created during "
            f"the first {record['base_n_days']} days and live {cfg.post_lifetime_days} days); "
            "append fewer days"
        )
    rng = np.random.default_rng([cfg.seed, first_day, seed])
    drifted = replace(truth, theta=drift_interests(truth.theta, drift, rng))
    for day in tqdm(days, desc="append days", disable=not progress):
        logs, truth_cols = _simulate_day(day, cfg, rng, drifted, extra, follow_keys, followers)
        write_table(layout.log_day(day) / "part-0.parquet", logs)
        write_table(layout.truth_impressions / f"day={day}" / "part-0.parquet", truth_cols)

    if not latent_epoch(layout, 0).exists():  # keep the original truth before latent.npz moves on
        truth.save(latent_epoch(layout, 0))
    drifted.save(latent_epoch(layout, first_day))
    drifted.save(layout.latent)
    record["appends"].append(
        {"first_day": first_day, "n_days": n_days, "drift": drift, "seed": seed}
    )
    (layout.root / APPENDED_FILE).write_text(json.dumps(record, indent=2))
    # Last: until world.json grows, readers of the world do not see the new days.
    layout.config.write_text(
        json.dumps(cfg.with_overrides(n_days=first_day + n_days).to_dict(), indent=2)
    )
    return layout
