"""The report of an online experiment: per variant metrics with confidence intervals, the
lift of each variant over the baseline with a significance test, guardrails, and (for
simulated traffic) the lift the world's ground truth predicts for the same exposures.

Statistics. Users are the randomisation unit, so every metric is a ratio of per-user sums
(``sum(Y_u) / sum(X_u)``: engagements per impression, dwell per session, ...) and its variance
is the delta method's over users (Deng et al., "Applying the Delta Method in Metric Analytics",
2018), which accounts for one user's impressions being correlated. Arms are independent: the
difference's variance is the sum; the test is a two-sided z-test, the interval 95 %.

Sessions are told apart by a gap in a user's feed requests longer than ``session_gap_s``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from feedrec.events.event_sink import EXPOSURE_SCHEMA

Z95 = 1.959963984540054
#: Metric -> (numerator, denominator) of per-user sums. ``engagements`` = likes + comments +
#: shares (a sum of indicators, so its expectation adds up over tasks).
METRICS: dict[str, tuple[str, str]] = {
    "engagement_rate": ("engagements", "impressions"),
    "like_rate": ("like", "impressions"),
    "hide_rate": ("hide", "impressions"),
    "dwell_per_session": ("dwell", "sessions"),
    "feeds_per_session": ("feeds", "sessions"),
    "sessions_per_user": ("sessions", "one"),
}
#: Metric -> the simulation's expectation column that predicts its numerator.
TRUTH_NUMERATORS = {
    "engagement_rate": "e_engagements",
    "like_rate": "e_like",
    "hide_rate": "e_hide",
    "dwell_per_session": "e_dwell",
}


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True)
class Estimate:
    """A ratio metric of one arm: value, its standard error, and the users behind it."""

    value: float
    se: float
    users: int

    @property
    def ci(self) -> tuple[float, float]:
        return (self.value - Z95 * self.se, self.value + Z95 * self.se)


def ratio_estimate(y: np.ndarray, x: np.ndarray) -> Estimate:
    """``sum(y) / sum(x)`` over users with its delta-method standard error. y, x: [users]."""
    n = len(x)
    if n < 2 or x.sum() <= 0:
        return Estimate(float("nan"), float("nan"), n)
    r = y.sum() / x.sum()
    mx = x.mean()
    var = np.var(y, ddof=1) - 2 * r * np.cov(x, y, ddof=1)[0, 1] + r * r * np.var(x, ddof=1)
    var = max(float(var), 0.0) / (n * mx * mx)
    return Estimate(float(r), math.sqrt(var), n)


@dataclass(frozen=True)
class Lift:
    """``variant - baseline`` of one metric with its 95 % CI and p-value; ``truth``: what the
    world's ground truth says the same exposures are worth (simulations only)."""

    metric: str
    variant: str
    baseline: str
    diff: float
    se: float
    p_value: float
    relative: float
    truth: float | None = None

    @property
    def ci(self) -> tuple[float, float]:
        return (self.diff - Z95 * self.se, self.diff + Z95 * self.se)

    @property
    def significant(self) -> bool:
        low, high = self.ci
        return low > 0 or high < 0

    @property
    def truth_agrees(self) -> bool | None:
        if self.truth is None:
            return None
        low, high = self.ci
        return low <= self.truth <= high


def read_exposures(world_dir: Path, request_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Every served slot the sink wrote (``<world>/live/exposures``), one row each; only
    those of the feeds ``request_ids`` names, if given (filtered while scanning: a world's
    exposures grow with all its traffic, 3.3M rows and 1.75 GiB of frame on the demo's run
    dir after benchmarks, when a simulation's own are 5k)."""
    root = Path(world_dir) / "live" / "exposures"
    if not root.exists():
        raise FileNotFoundError(f"{root}: no exposures; run `feedrec events sink` first")
    # The explicit schema reads files written before a column existed (as nulls).
    dataset = pads.dataset(root, format="parquet", partitioning="hive", schema=EXPOSURE_SCHEMA)
    wanted = None
    if request_ids is not None:
        wanted = pads.field("request_id").isin(pa.array(list(request_ids), pa.string()))
    frame = dataset.to_table(columns=EXPOSURE_SCHEMA.names, filter=wanted).to_pandas()
    frame["explored"] = frame["explored"].fillna(False).astype(bool)
    return frame


def simulated_only(exposures: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    """The exposures of a simulation's feeds (its ``truth.parquet`` names them): a bus also
    holds feeds other clients asked for, whose users the simulation did not play."""
    return exposures[exposures["request_id"].isin(set(truth["request_id"]))]


def user_sums(exposures: pd.DataFrame, session_gap_s: float) -> pd.DataFrame:
    """Per (variant, user): impressions, engagements, like, hide, dwell (impressed slots),
    feeds and sessions (all served feeds), and ``one`` (1, for per-user means)."""
    feeds = (
        exposures.groupby("request_id")
        .agg(
            user_id=("user_id", "first"), variant=("variant", "first"), at=("received_at", "first")
        )
        .sort_values(["user_id", "at"])
    )
    gap = feeds.groupby("user_id")["at"].diff()
    feeds["new_session"] = gap.isna() | (gap > session_gap_s)
    per_user = feeds.groupby(["variant", "user_id"]).agg(
        feeds=("new_session", "size"), sessions=("new_session", "sum")
    )
    shown = exposures[exposures["impressed"] == 1].assign(
        engagements=lambda d: d["like"] + d["comment"] + d["share"]
    )
    engaged = shown.groupby(["variant", "user_id"]).agg(
        impressions=("impressed", "size"),
        engagements=("engagements", "sum"),
        like=("like", "sum"),
        hide=("hide", "sum"),
        dwell=("dwell", "sum"),
    )
    out = per_user.join(engaged, how="left").fillna(0.0)
    out["one"] = 1.0
    return out.reset_index()


@dataclass
class ExperimentReport:
    """Per-variant estimates, lifts over ``baseline``, guardrails and the data's size."""

    baseline: str
    estimates: dict[str, dict[str, Estimate]]
    lifts: list[Lift]
    guardrails: dict[str, dict[str, float]]
    counts: dict[str, dict[str, int]]

    def lift(self, metric: str, variant: str) -> Lift:
        return next(x for x in self.lifts if x.metric == metric and x.variant == variant)

    def to_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "estimates": {
                v: {m: {**asdict(e), "ci": e.ci} for m, e in ms.items()}
                for v, ms in self.estimates.items()
            },
            "lifts": [
                {
                    **asdict(x),
                    "ci": x.ci,
                    "significant": x.significant,
                    "truth_agrees": x.truth_agrees,
                }
                for x in self.lifts
            ],
            "guardrails": self.guardrails,
            "counts": self.counts,
        }


def analyse(
    exposures: pd.DataFrame,
    *,
    baseline: str | None = None,
    session_gap_s: float = 1800.0,
    truth: pd.DataFrame | None = None,
) -> ExperimentReport:
    """The report of ``exposures`` (``read_exposures``); ``truth``: a simulation's
    ``truth.parquet`` (per ``request_id``, ``position``: expected outcomes)."""
    variants = sorted(exposures["variant"].unique())
    if len(variants) < 2:
        raise ValueError(f"an experiment needs two variants; the exposures have {variants}")
    if baseline is None:
        baseline = "popularity" if "popularity" in variants else variants[0]
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not a variant of the exposures: {variants}")
    sums = user_sums(exposures, session_gap_s)
    estimates = {
        v: {
            m: ratio_estimate(g[num].to_numpy(float), g[den].to_numpy(float))
            for m, (num, den) in METRICS.items()
        }
        for v, g in sums.groupby("variant")
    }
    truth_values = _truth_values(exposures, truth, sums) if truth is not None else {}
    lifts = []
    for v in variants:
        if v == baseline:
            continue
        for m in METRICS:
            a, b = estimates[v][m], estimates[baseline][m]
            se = math.sqrt(a.se**2 + b.se**2)
            diff = a.value - b.value
            p = 2 * _normal_sf(abs(diff) / se) if se > 0 else float("nan")
            t = truth_values.get(v, {}).get(m)
            t_base = truth_values.get(baseline, {}).get(m)
            lifts.append(
                Lift(
                    metric=m,
                    variant=v,
                    baseline=baseline,
                    diff=diff,
                    se=se,
                    p_value=p,
                    relative=diff / b.value if b.value else float("nan"),
                    truth=None if t is None or t_base is None else t - t_base,
                )
            )
    feeds = exposures.drop_duplicates("request_id")
    guardrails = {
        str(v): {
            "latency_p50_ms": float(np.percentile(g["latency_ms"], 50)),
            "latency_p99_ms": float(np.percentile(g["latency_ms"], 99)),
            "fallback_rate": float(g["fallback"].mean()),
            "cold_start_rate": float(g["cold_start"].mean()),
        }
        for v, g in feeds.groupby("variant")
    }
    counts = {
        str(v): {
            "users": len(g),
            "sessions": int(g["sessions"].sum()),
            "feeds": int(g["feeds"].sum()),
            "impressions": int(g["impressions"].sum()),
        }
        for v, g in sums.groupby("variant")
    }
    return ExperimentReport(baseline, estimates, lifts, guardrails, counts)


def _truth_values(
    exposures: pd.DataFrame, truth: pd.DataFrame, sums: pd.DataFrame
) -> dict[str, dict[str, float]]:
    """Per variant and metric, the value the ground truth expects for the impressed slots
    (same denominators as the measured metric)."""
    shown = exposures[exposures["impressed"] == 1][["request_id", "position", "variant"]]
    t = truth.assign(e_engagements=truth["e_like"] + truth["e_comment"] + truth["e_share"])
    joined = shown.merge(t.drop(columns=["variant"]), on=["request_id", "position"], how="inner")
    out: dict[str, dict[str, float]] = {}
    for v, g in joined.groupby("variant"):
        denominators = sums[sums["variant"] == v][["impressions", "sessions"]].sum()
        out[str(v)] = {
            m: float(g[col].sum() / denominators[METRICS[m][1]])
            for m, col in TRUTH_NUMERATORS.items()
        }
    return out


def write_report(report: ExperimentReport, out_dir: Path) -> Path:
    """``report.md`` (tables), ``report.json`` and ``report.png`` (per-variant metrics with
    95 % CIs, and each lift with its CI and the ground truth's value) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _plot(report, out_dir / "report.png")
    lines = [
        "# Experiment report",
        "",
        f"Baseline: `{report.baseline}`. 95 % intervals, delta method over users; "
        "two-sided z-test.",
        "",
        "| variant | users | sessions | feeds | impressions |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, c in report.counts.items():
        lines.append(
            f"| {v} | {c['users']} | {c['sessions']} | {c['feeds']} | {c['impressions']} |"
        )
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(report.estimates) + " |"]
    lines.append("|---|" + "---:|" * len(report.estimates))
    for m in METRICS:
        cells = []
        for v in report.estimates:
            e = report.estimates[v][m]
            cells.append(f"{e.value:.4f} [{e.ci[0]:.4f}, {e.ci[1]:.4f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Lift over the baseline",
        "",
        "| variant | metric | lift | 95 % CI | relative | p | ground truth | truth in CI |",
        "|---|---|---:|---|---:|---:|---:|---|",
    ]
    for x in report.lifts:
        truth = "" if x.truth is None else f"{x.truth:+.4f}"
        agrees = "" if x.truth_agrees is None else ("yes" if x.truth_agrees else "**no**")
        lines.append(
            f"| {x.variant} | {x.metric} | {x.diff:+.4f} | [{x.ci[0]:+.4f}, {x.ci[1]:+.4f}] | "
            f"{x.relative:+.1%} | {x.p_value:.2g} | {truth} | {agrees} |"
        )
    lines += ["", "## Guardrails", "", "| variant | p50 ms | p99 ms | fallback | cold start |"]
    lines.append("|---|---:|---:|---:|---:|")
    for v, g in report.guardrails.items():
        lines.append(
            f"| {v} | {g['latency_p50_ms']:.1f} | {g['latency_p99_ms']:.1f} | "
            f"{g['fallback_rate']:.2%} | {g['cold_start_rate']:.2%} |"
        )
    lines += ["", "![metrics and lifts](report.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _plot(report: ExperimentReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(METRICS)
    fig, axes = plt.subplots(2, len(metrics), figsize=(3.2 * len(metrics), 6.4))
    variants = list(report.estimates)
    for j, m in enumerate(metrics):
        ax = axes[0, j]
        values = [report.estimates[v][m].value for v in variants]
        errors = [Z95 * report.estimates[v][m].se for v in variants]
        ax.bar(variants, values, yerr=errors, capsize=4, color="#4c72b0")
        ax.set_title(m, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax = axes[1, j]
        lifts = [x for x in report.lifts if x.metric == m]
        names = [x.variant for x in lifts]
        ax.errorbar(
            names,
            [x.diff for x in lifts],
            yerr=[Z95 * x.se for x in lifts],
            fmt="o",
            capsize=4,
            label="measured (95% CI)",
        )
        truths = [(x.variant, x.truth) for x in lifts if x.truth is not None]
        if truths:
            ax.plot(*zip(*truths, strict=True), "r*", markersize=10, label="ground truth")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_title(f"lift vs {report.baseline}", fontsize=9)
        if j == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
