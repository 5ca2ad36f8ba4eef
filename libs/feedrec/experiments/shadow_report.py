"""The report of shadow traffic: how a candidate model's unseen feeds compare with the feeds
served for the same requests, and what users did with the posts the two disagree on. The
candidate is a ranker (re-ranking the served candidates) or a retrieval (its candidates ranked
by the served ranker); each comparison names both versions, e.g. ``ranker-v1`` against
``ranker-v2`` or ``retrieval-v1`` against ``retrieval-v2``.

For every served feed that was also built in shadow (``<world>/live/shadow``, written by the
sink from the Ingress's ``shadow`` records) and whose exposures are written
(``<world>/live/exposures``): the share of served posts the shadow model would also have
served (overlap), whether both put the same post first, and the engagement rate of impressed
served slots the shadow model would have *kept* against those it would have *dropped*. A
candidate that drops what users engage with is a candidate to look at before promoting. What
users would have done with the posts only the shadow model picked is not observed: that is
what an A/B test or the off-policy estimates (``feedrec experiments ope``) are for.

Users are the unit of the intervals, as in ``feedrec.experiments.experiment_report``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from feedrec.events.event_sink import SHADOW_SCHEMA
from feedrec.experiments.experiment_report import Z95, Estimate, ratio_estimate

#: Engagements of a slot: likes + comments + shares (as in the experiment report).
ENGAGEMENTS = ("like", "comment", "share")


def read_shadow(world_dir: Path) -> pd.DataFrame:
    """Every slot of every shadow feed the sink wrote (``<world>/live/shadow``), one row each."""
    root = Path(world_dir) / "live" / "shadow"
    if not root.exists():
        raise FileNotFoundError(
            f"{root}: no shadow feeds; set one (`feedrec models shadow VERSION`), serve "
            "traffic, then run `feedrec events sink`"
        )
    dataset = pads.dataset(root, format="parquet", partitioning="hive", schema=SHADOW_SCHEMA)
    return dataset.to_table(columns=SHADOW_SCHEMA.names).to_pandas()


@dataclass(frozen=True)
class ShadowComparison:
    """One shadow model against the model of its kind served on the same requests.

    Attributes:
        feeds: served feeds with a shadow feed and written exposures; ``awaiting``: shadow
            feeds whose served feed is still in its attribution window (not compared yet).
        overlap: per feed, the share of served posts the shadow feed holds too [feeds].
        kept, dropped: engagement rate (likes + comments + shares per impressed slot) of the
            served slots the shadow model would have kept / not served.
        shadow_only: posts per feed that only the shadow model would have served.
    """

    served_model_version: str
    shadow_model_version: str
    feeds: int
    awaiting: int
    users: int
    overlap: list[float]
    top1_agreement: float
    kept: Estimate
    dropped: Estimate
    shadow_only: float
    latency_p50_ms: float
    latency_p99_ms: float

    @property
    def mean_overlap(self) -> float:
        return float(np.mean(self.overlap)) if self.overlap else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["overlap"] = {
            "mean": self.mean_overlap,
            **{
                f"p{q}": float(np.percentile(self.overlap, q)) if self.overlap else float("nan")
                for q in (10, 50, 90)
            },
        }
        for name in ("kept", "dropped"):
            out[name]["ci"] = list(getattr(self, name).ci)
        return out


@dataclass(frozen=True)
class ShadowReport:
    comparisons: list[ShadowComparison] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"comparisons": [c.to_dict() for c in self.comparisons]}


def _rate_by_user(slots: pd.DataFrame, users: np.ndarray) -> Estimate:
    """Engagements per impressed slot over ``slots``, users [U] as the unit."""
    shown = slots[slots["impressed"] == 1]
    per_user = (
        shown.assign(engagements=shown[list(ENGAGEMENTS)].sum(axis=1), impressions=1)
        .groupby("user_id")[["engagements", "impressions"]]
        .sum()
        .reindex(users, fill_value=0)
    )
    return ratio_estimate(
        per_user["engagements"].to_numpy(np.float64), per_user["impressions"].to_numpy(np.float64)
    )


def analyse_shadow(shadow: pd.DataFrame, exposures: pd.DataFrame) -> ShadowReport:
    """The report of ``shadow`` (``read_shadow``) against ``exposures``
    (``experiment_report.read_exposures``), one comparison per (served, shadow) version pair."""
    comparisons = []
    pairs = shadow[["served_model_version", "shadow_model_version"]].drop_duplicates()
    for served_version, shadow_version in pairs.itertuples(index=False):
        rows = shadow[
            (shadow["served_model_version"] == served_version)
            & (shadow["shadow_model_version"] == shadow_version)
        ]
        requests = rows["request_id"].unique()
        served = exposures[exposures["request_id"].isin(requests)]
        compared = served["request_id"].unique()
        rows = rows[rows["request_id"].isin(compared)]
        kept_keys = set(zip(rows["request_id"], rows["post_id"], strict=True))
        served = served.assign(
            kept=[
                (r, p) in kept_keys
                for r, p in zip(served["request_id"], served["post_id"], strict=True)
            ]
        )
        overlap = served.groupby("request_id")["kept"].mean()
        first_served = served[served["position"] == 0].set_index("request_id")["post_id"]
        first_shadow = rows[rows["position"] == 0].set_index("request_id")["post_id"]
        both = first_served.index.intersection(first_shadow.index)
        users = np.sort(served["user_id"].unique())
        latency = rows.drop_duplicates("request_id")["latency_ms"].to_numpy(np.float64)
        shadow_only = int((rows["served_position"] < 0).sum())
        comparisons.append(
            ShadowComparison(
                served_model_version=str(served_version),
                shadow_model_version=str(shadow_version),
                feeds=len(compared),
                awaiting=len(requests) - len(compared),
                users=len(users),
                overlap=[float(x) for x in overlap.to_numpy()],
                top1_agreement=float((first_served[both] == first_shadow[both]).mean())
                if len(both)
                else float("nan"),
                kept=_rate_by_user(served[served["kept"]], users),
                dropped=_rate_by_user(served[~served["kept"]], users),
                shadow_only=shadow_only / len(compared) if len(compared) else float("nan"),
                latency_p50_ms=float(np.percentile(latency, 50)) if len(latency) else float("nan"),
                latency_p99_ms=float(np.percentile(latency, 99)) if len(latency) else float("nan"),
            )
        )
    return ShadowReport(comparisons)


def write_shadow_report(report: ShadowReport, out_dir: Path) -> Path:
    """``shadow.md`` (a table per comparison), ``shadow.json`` and ``shadow.png`` (overlap
    histogram; kept vs dropped engagement with 95 % CIs) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shadow.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    _plot(report, out_dir / "shadow.png")
    lines = [
        "# Shadow traffic report",
        "",
        "Served feeds that were also built, unseen, with a shadow model (a ranker, or a "
        "retrieval whose candidates the served ranker ranked). Engagement: likes + "
        "comments + shares per impressed served slot, 95 % intervals over users.",
        "",
        "| served | shadow | feeds | users | overlap mean | same first post | engagement of "
        "kept slots | of dropped slots | shadow-only posts / feed | shadow p50 / p99 ms |",
        "|---|---|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for c in report.comparisons:
        kept, dropped = c.kept, c.dropped
        lines.append(
            f"| {c.served_model_version} | {c.shadow_model_version} | {c.feeds} | {c.users} | "
            f"{c.mean_overlap:.3f} | {c.top1_agreement:.1%} | "
            f"{kept.value:.4f} [{kept.ci[0]:.4f}, {kept.ci[1]:.4f}] | "
            f"{dropped.value:.4f} [{dropped.ci[0]:.4f}, {dropped.ci[1]:.4f}] | "
            f"{c.shadow_only:.2f} | {c.latency_p50_ms:.1f} / {c.latency_p99_ms:.1f} |"
        )
    awaiting = sum(c.awaiting for c in report.comparisons)
    if awaiting:
        lines += ["", f"{awaiting} shadow feeds wait for their served feed's exposures."]
    lines += ["", "![overlap and engagement](shadow.png)", ""]
    path = out_dir / "shadow.md"
    path.write_text("\n".join(lines))
    return path


def _plot(report: ShadowReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for c in report.comparisons:
        name = f"{c.shadow_model_version} vs {c.served_model_version}"
        # Overlaps are k / feed length: bins centred on tenths keep 0.7 out of the 0.6 bin.
        left.hist(c.overlap, bins=np.linspace(-0.05, 1.05, 12), alpha=0.6, label=name)
    left.set_xlabel("share of the served feed the shadow model would also serve")
    left.set_ylabel("feeds")
    left.legend(fontsize=8)
    labels, values, errors = [], [], []
    for c in report.comparisons:
        for name, e in (("kept", c.kept), ("dropped", c.dropped)):
            labels.append(f"{c.shadow_model_version}\n{name}")
            values.append(e.value)
            errors.append(Z95 * e.se)
    right.bar(labels, values, yerr=errors, capsize=4, color="#4c72b0")
    right.set_ylabel("engagements per impressed served slot")
    right.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
