"""Drift detection: PSI and KS per feature and per ranker prediction, training time vs now.

A *reference* sample of preprocessed examples (by default the training split's days whose feature
windows are full) is compared with a *recent* one (by default the test split, i.e. the last
logged day), feature by feature:

* dense features: the ranker's 1-d dense inputs after their transforms (what the model sees),
  PSI over ``n_bins`` quantile bins of the reference and the two-sample KS statistic;
* categorical features: PSI over the shares of the reference's ``top_k`` most frequent values
  plus one "other" bucket (user and post ids are left out: posts live a week, so a new day always
  shows other posts and other users, whatever drifted);
* predictions: the ranker's per-task outputs on both samples (PSI and KS, like dense features).

``PSI = sum_b (q_b - p_b) * ln(q_b / p_b)`` with p the reference's and q the recent sample's share
of bin b, each floored at ``eps`` (an empty bin would make it infinite). Rules of thumb: < 0.1
stable, 0.1 .. 0.2 a moderate shift (warn), >= 0.2 a significant one (alert).

No Ray and no training here: the job reads Parquet examples, samples them, and runs the ranker
eagerly on the samples. :func:`run_drift` writes ``drift.json`` and ``drift.html``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from feedrec.data.examples import Columns, columns_from_arrow
from feedrec.data.preprocess import SPLITS, PreprocessLayout
from feedrec.schema.registry import RAW_COLUMNS, TASKS, WINDOW_DAYS, dense_features

if TYPE_CHECKING:
    from feedrec.features.transform import FeatureTransform
    from feedrec.models.predictor import RankerPredictor

FeatureKind = Literal["dense", "categorical", "prediction"]
Status = Literal["ok", "warn", "alert"]

#: Categorical raw columns compared by default (``u_recent_topics`` is a -1 padded list: its
#: slots are pooled, so the share of -1 says how many users have an engagement history).
DEFAULT_CATEGORICAL: tuple[str, ...] = (
    "user_segment",
    "creator_id",
    "topic",
    "media_type",
    "u_recent_topics",
)
#: Prefix of the prediction rows: ``pred_like`` .. ``pred_dwell`` (registry ``TASKS`` order).
PREDICTION_PREFIX = "pred_"


@dataclass(frozen=True)
class DriftConfig:
    """How two samples are compared and when a difference is an alert.

    Args:
        psi_warn, psi_alert: PSI at or above which a feature warns / alerts (0 < warn <= alert).
        ks_alert: KS statistic at or above which a dense feature or prediction alerts too; None:
            KS is reported only (with large samples it flags differences too small to matter).
        n_bins: quantile bins of the reference for the PSI of a continuous feature (ties merge
            bins, so a feature with few distinct values gets fewer).
        eps: floor of a bin's share.
        top_k: categorical features: the reference's most frequent values kept as categories.
        hist_bins: equal-width bins of the histograms kept for the report.
        categorical: raw id columns compared as categorical features.
    """

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    ks_alert: float | None = None
    n_bins: int = 10
    eps: float = 1e-4
    top_k: int = 20
    hist_bins: int = 30
    categorical: tuple[str, ...] = DEFAULT_CATEGORICAL

    def __post_init__(self) -> None:
        if not 0.0 < self.psi_warn <= self.psi_alert:
            raise ValueError("drift config: need 0 < psi_warn <= psi_alert")
        if self.ks_alert is not None and not 0.0 < self.ks_alert <= 1.0:
            raise ValueError("drift config: ks_alert must be in (0, 1] or None")
        if self.n_bins < 2 or self.hist_bins < 2:
            raise ValueError("drift config: n_bins and hist_bins must be >= 2")
        if not 0.0 < self.eps < 1.0 / self.n_bins:
            raise ValueError("drift config: eps must be in (0, 1 / n_bins)")
        if self.top_k < 1:
            raise ValueError("drift config: top_k must be >= 1")
        ids = {c.name for c in RAW_COLUMNS if c.dtype == "int64"}
        unknown = set(self.categorical) - ids
        if unknown:
            raise ValueError(f"drift config: {sorted(unknown)} are not raw id columns")

    def status(self, psi: float, ks: float | None = None) -> Status:
        """``alert`` / ``warn`` / ``ok`` for a feature's statistics."""
        if psi >= self.psi_alert or (
            self.ks_alert is not None and ks is not None and ks >= self.ks_alert
        ):
            return "alert"
        return "warn" if psi >= self.psi_warn else "ok"


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _nonempty(*samples: np.ndarray) -> None:
    if any(len(s) == 0 for s in samples):
        raise ValueError("drift statistics need non-empty samples")


def quantile_edges(reference: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges float64 [<= n_bins - 1]: the reference's 1/n_bins .. (n_bins-1)/n_bins
    quantiles, duplicates merged. Bin b is ``(edge[b-1], edge[b]]``; the outer bins are open."""
    _nonempty(reference)
    qs = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    return np.unique(np.quantile(np.asarray(reference, np.float64), qs))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` [N] in each bin of ``edges`` [E]: float64 [E + 1], summing to 1."""
    _nonempty(values)
    # side="left": a value equal to an edge falls in the bin that edge closes, so the ties a
    # quantile edge sits on (e.g. the many zeros of a count) all land in one bin.
    codes = np.searchsorted(edges, np.asarray(values, np.float64), side="left")
    return np.bincount(codes, minlength=len(edges) + 1) / len(values)


def psi_from_shares(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """PSI of aligned bin shares [B] (reference ``expected``, recent ``actual``)."""
    p = np.maximum(np.asarray(expected, np.float64), eps)
    q = np.maximum(np.asarray(actual, np.float64), eps)
    if p.shape != q.shape:
        raise ValueError(f"psi: share shapes differ ({p.shape} vs {q.shape})")
    return float(np.sum((q - p) * np.log(q / p)))


def psi(reference: np.ndarray, recent: np.ndarray, n_bins: int = 10, eps: float = 1e-4) -> float:
    """PSI of a continuous feature, float [N] vs [M], over the reference's quantile bins."""
    edges = quantile_edges(reference, n_bins)
    return psi_from_shares(bin_shares(reference, edges), bin_shares(recent, edges), eps)


def category_shares(
    reference: np.ndarray, recent: np.ndarray, top_k: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Shares of the reference's ``top_k`` most frequent values (ties: smaller value first)
    and of everything else ("other"), in both samples.

    Args:
        reference, recent: int [N], [M] (any shape: lists are pooled).
    Returns:
        (category labels [K + 1], reference shares [K + 1], recent shares [K + 1]).
    """
    ref, rec = np.asarray(reference).reshape(-1), np.asarray(recent).reshape(-1)
    _nonempty(ref, rec)
    values, counts = np.unique(ref, return_counts=True)
    top = values[np.lexsort((values, -counts))[:top_k]]
    by_value = np.argsort(top)
    sorted_top = top[by_value]

    def shares(x: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(sorted_top, x), len(sorted_top) - 1)
        code = np.where(sorted_top[pos] == x, by_value[pos], len(top))
        return np.bincount(code, minlength=len(top) + 1) / len(x)

    return [str(v) for v in top.tolist()] + ["other"], shares(ref), shares(rec)


def categorical_psi(
    reference: np.ndarray, recent: np.ndarray, top_k: int = 20, eps: float = 1e-4
) -> float:
    """PSI of a categorical feature over its top-k reference categories plus "other"."""
    _, p, q = category_shares(reference, recent, top_k)
    return psi_from_shares(p, q, eps)


def ks_statistic(reference: np.ndarray, recent: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: max |F_ref(x) - F_recent(x)| over x, in [0, 1]."""
    _nonempty(reference, recent)
    a = np.sort(np.asarray(reference, np.float64))
    b = np.sort(np.asarray(recent, np.float64))
    # Both empirical CDFs jump only at sample points: evaluating at all of them finds the sup.
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _histogram(reference: np.ndarray, recent: np.ndarray, n_bins: int) -> dict[str, list[Any]]:
    """Equal-width shares of both samples over their pooled 0.5 .. 99.5 percentile range
    (outliers clipped into the end bins, so one extreme value does not flatten the plot)."""
    pooled = np.concatenate([reference, recent]).astype(np.float64)
    lo, hi = np.quantile(pooled, [0.005, 0.995])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, n_bins + 1)

    def shares(x: np.ndarray) -> list[float]:
        counts, _ = np.histogram(np.clip(x, lo, hi), bins=edges)
        return (counts / len(x)).tolist()

    return {"edges": edges.tolist(), "reference": shares(reference), "recent": shares(recent)}


# ---------------------------------------------------------------------------------------------
# Per-feature results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's (or prediction's) drift.

    ``histogram``: dense and prediction rows ``{"edges" [B+1], "reference" [B], "recent" [B]}``
    (equal-width bin shares); categorical rows ``{"categories" [K+1], "reference", "recent"}``.
    ``ks`` and the means are None for categorical rows.
    """

    name: str
    kind: FeatureKind
    psi: float
    ks: float | None
    status: Status
    reference_mean: float | None
    recent_mean: float | None
    histogram: dict[str, list[Any]] = field(repr=False)


def feature_drift(
    name: str, kind: FeatureKind, reference: np.ndarray, recent: np.ndarray, cfg: DriftConfig
) -> FeatureDrift:
    """Compare one feature's samples (reference [N], recent [M]; categorical may be [N, L])."""
    if kind == "categorical":
        categories, p, q = category_shares(reference, recent, cfg.top_k)
        value = psi_from_shares(p, q, cfg.eps)
        hist = {"categories": categories, "reference": p.tolist(), "recent": q.tolist()}
        return FeatureDrift(name, kind, value, None, cfg.status(value), None, None, hist)
    ref = np.asarray(reference, np.float64).reshape(-1)
    rec = np.asarray(recent, np.float64).reshape(-1)
    value, ks = psi(ref, rec, cfg.n_bins, cfg.eps), ks_statistic(ref, rec)
    return FeatureDrift(
        name,
        kind,
        value,
        ks,
        cfg.status(value, ks),
        float(ref.mean()),
        float(rec.mean()),
        _histogram(ref, rec, cfg.hist_bins),
    )


def compare_samples(
    reference: dict[str, np.ndarray],
    recent: dict[str, np.ndarray],
    kinds: dict[str, FeatureKind],
    cfg: DriftConfig,
) -> tuple[FeatureDrift, ...]:
    """One row per entry of ``kinds`` (in its order); both samples must have every name."""
    missing = [n for n in kinds if n not in reference or n not in recent]
    if missing:
        raise ValueError(f"drift: features {missing} missing from a sample")
    return tuple(feature_drift(n, k, reference[n], recent[n], cfg) for n, k in kinds.items())


@dataclass(frozen=True)
class DriftResult:
    """All rows of one comparison, with where the samples came from.

    ``reference`` / ``recent``: ``{"data_dir", "split", "days", "rows"}``; ``ranker``: the artifact
    whose predictions were compared (None: features only).
    """

    features: tuple[FeatureDrift, ...]
    config: DriftConfig
    reference: dict[str, Any] = field(default_factory=dict)
    recent: dict[str, Any] = field(default_factory=dict)
    ranker: str | None = None

    def _named(self, status: Status) -> tuple[str, ...]:
        rows = sorted((r for r in self.features if r.status == status), key=lambda r: -r.psi)
        return tuple(r.name for r in rows)

    @property
    def alerts(self) -> tuple[str, ...]:
        """Names of the features at ``alert``, the largest PSI first."""
        return self._named("alert")

    @property
    def warnings(self) -> tuple[str, ...]:
        """Names of the features at ``warn``, the largest PSI first."""
        return self._named("warn")

    def row(self, name: str) -> FeatureDrift:
        for r in self.features:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (what ``drift.json`` holds)."""
        return {
            "alert": bool(self.alerts),
            "alerts": list(self.alerts),
            "warnings": list(self.warnings),
            "reference": self.reference,
            "recent": self.recent,
            "ranker": self.ranker,
            "config": asdict(self.config),
            "features": [asdict(r) for r in self.features],
        }

    def summary(self) -> str:
        """A few lines for a terminal: the alerts and warnings with their PSI."""

        def listed(names: tuple[str, ...]) -> str:
            return ", ".join(f"{n} (PSI {self.row(n).psi:.3f})" for n in names) or "none"

        top = sorted(self.features, key=lambda r: -r.psi)[:5]
        return "\n".join(
            [
                f"drift: {self.recent.get('split', 'recent')} days {self.recent.get('days')} vs "
                f"{self.reference.get('split', 'reference')} days {self.reference.get('days')}"
                f" ({len(self.features)} features)",
                f"alerts (PSI >= {self.config.psi_alert}): {listed(self.alerts)}",
                f"warnings (PSI >= {self.config.psi_warn}): {listed(self.warnings)}",
                "largest PSI: " + ", ".join(f"{r.name} {r.psi:.3f}" for r in top),
            ]
        )


# ---------------------------------------------------------------------------------------------
# From examples to samples
# ---------------------------------------------------------------------------------------------


def drift_features(
    raw: Columns, transform: FeatureTransform, categorical: Sequence[str] = DEFAULT_CATEGORICAL
) -> tuple[dict[str, np.ndarray], dict[str, FeatureKind]]:
    """Example columns (length N) -> (feature name -> values, feature name -> kind).

    Dense: the ranker's dense inputs of width 1, float32 [N] each, in registry order (the
    32-d content embedding is left out: its coordinates mean nothing one by one). Categorical:
    the raw id columns, int64 [N] or [N, L].
    """
    dense = transform(raw, "ranker").dense
    values: dict[str, np.ndarray] = {}
    kinds: dict[str, FeatureKind] = {}
    col = 0
    for spec in dense_features("ranker"):
        if spec.dim == 1:
            values[spec.name], kinds[spec.name] = dense[:, col], "dense"
        col += spec.dim
    for name in categorical:
        values[name], kinds[name] = np.asarray(raw[name]), "categorical"
    return values, kinds


def ranker_predictions(
    raw: Columns, predictor: RankerPredictor, transform: FeatureTransform
) -> dict[str, np.ndarray]:
    """The ranker's outputs on examples: ``pred_<task>`` -> float32 [N] per task of ``TASKS``."""
    pred = predictor.predict(transform(raw, "ranker"))
    return {f"{PREDICTION_PREFIX}{task}": pred[:, i] for i, task in enumerate(TASKS)}


def _row_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (row id, seed): uniform uint64 keys that do not depend on the row order."""
    with np.errstate(over="ignore"):
        z = np.asarray(ids).astype(np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_examples(
    path: Path, days: Sequence[int] | None, max_rows: int, seed: int = 0
) -> Columns:
    """A uniform sample of at most ``max_rows`` examples of ``days`` (None: all) from a split
    directory, with the raw feature columns, ``impression_id`` and ``day``.

    Streams the files batch by batch and keeps the rows with the smallest hashed impression ids
    (bottom-k sampling): memory stays O(max_rows + batch), and the sample depends on the rows and
    the seed only, not on the order the files are listed in.
    """
    names = [c.name for c in RAW_COLUMNS] + ["impression_id", "day"]
    dataset = pads.dataset(path, format="parquet")
    filt = pads.field("day").isin(list(days)) if days is not None else None
    kept: Columns = {}
    keys = np.zeros(0, np.uint64)
    for batch in dataset.to_batches(columns=names, filter=filt, batch_size=65536):
        if not batch.num_rows:
            continue
        cols = columns_from_arrow(pa.Table.from_batches([batch]))
        new_keys = _row_keys(cols["impression_id"], seed)
        if kept:
            cols = {k: np.concatenate([kept[k], v]) for k, v in cols.items()}
            new_keys = np.concatenate([keys, new_keys])
        if len(new_keys) > max_rows:
            idx = np.argpartition(new_keys, max_rows - 1)[:max_rows]
            cols, new_keys = {k: v[idx] for k, v in cols.items()}, new_keys[idx]
        kept, keys = cols, new_keys
    if not kept:
        raise ValueError(f"drift: no examples in {path} for days {days}")
    order = np.argsort(keys, kind="stable")
    return {k: v[order] for k, v in kept.items()}


def split_days(
    meta: dict[str, Any], split: str, last: int | None = None, *, warm: bool = False
) -> list[int]:
    """The days of ``split`` (preprocess ``meta.json``) to sample.

    Args:
        last: the last ``last`` days of the split only.
        warm: (``last`` None, time split) only the days whose feature windows are full: the user
            and creator aggregates cover ``WINDOW_DAYS`` earlier days and a post lives
            ``post_lifetime_days``, so on the first days of the log the counts are still growing.
            A reference of every training day mixes that warm-up in and flags it as drift on any
            later day. Without a warm day, the split's last day.
    """
    days = [int(d) for d in meta[f"{split}_days"]]
    if last is not None:
        return days[-last:]
    if not warm or meta.get("split", {}).get("kind", "time") != "time":
        return days
    lifetime = float(meta.get("world", {}).get("post_lifetime_days", 0.0))
    warm_from = max(WINDOW_DAYS, math.ceil(lifetime))
    return [d for d in days if d >= warm_from] or days[-1:]


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftJob:
    """What to compare and where to write the report.

    Args:
        data_dir: preprocess outputs holding the recent examples (and, by default, the reference).
        out_dir: where ``drift.json`` and ``drift.html`` go.
        ranker_dir: a ranker artifact whose predictions are compared too (None: features only).
            Its vocabularies must come from the same entity ids (the same world).
        reference_data_dir: preprocess outputs of the reference (default ``data_dir``), e.g. a
            snapshot taken when the model was trained.
        reference_split, recent_split: splits compared (default train vs test).
        reference_days: the last N days of the reference split; None: its warm days
            (:func:`split_days`).
        recent_days: the last N days of the recent split; None: all of them.
        max_rows: rows sampled from each side.
        seed: sampling seed.
        stats: statistics and thresholds.
    """

    data_dir: Path
    out_dir: Path
    ranker_dir: Path | None = None
    reference_data_dir: Path | None = None
    reference_split: str = "train"
    recent_split: str = "test"
    reference_days: int | None = None
    recent_days: int | None = None
    max_rows: int = 20_000
    seed: int = 0
    stats: DriftConfig = field(default_factory=DriftConfig)

    def __post_init__(self) -> None:
        for split in (self.reference_split, self.recent_split):
            if split not in SPLITS:
                raise ValueError(f"drift job: unknown split {split!r}; expected one of {SPLITS}")
        for days in (self.reference_days, self.recent_days):
            if days is not None and days < 1:
                raise ValueError("drift job: reference_days and recent_days must be >= 1")
        if self.max_rows < 100:
            raise ValueError("drift job: max_rows must be >= 100")
        if self.seed < 0:
            raise ValueError("drift job: seed must be >= 0")


def run_drift(job: DriftJob) -> DriftResult:
    """Sample both sides, compare features (and predictions), write ``drift.json`` and
    ``drift.html`` into ``job.out_dir``. Raises FileNotFoundError without preprocessed data."""
    from feedrec.features.transform import FeatureTransform
    from feedrec.features.vocabulary import Vocabularies
    from feedrec.monitoring.drift_report import write_drift_report

    recent_data = PreprocessLayout(Path(job.data_dir))
    reference_data = PreprocessLayout(Path(job.reference_data_dir or job.data_dir))
    for data in (recent_data, reference_data):
        if not data.meta.exists():
            raise FileNotFoundError(f"no preprocessed data in {data.root}: run preprocess first")
    ref_days = split_days(
        reference_data.read_meta(), job.reference_split, job.reference_days, warm=True
    )
    rec_days = split_days(recent_data.read_meta(), job.recent_split, job.recent_days)
    reference = sample_examples(
        reference_data.examples(job.reference_split), ref_days, job.max_rows, job.seed
    )
    recent = sample_examples(
        recent_data.examples(job.recent_split), rec_days, job.max_rows, job.seed
    )

    predictor: RankerPredictor | None = None
    if job.ranker_dir is not None:
        from feedrec.artifacts import load_artifact
        from feedrec.models.predictor import RankerPredictor

        artifact = load_artifact(Path(job.ranker_dir))
        predictor = RankerPredictor.from_artifact(artifact)
        transform = FeatureTransform(artifact.vocabs)
    else:
        transform = FeatureTransform(Vocabularies.load(recent_data.vocabularies))

    ref_values, kinds = drift_features(reference, transform, job.stats.categorical)
    rec_values, _ = drift_features(recent, transform, job.stats.categorical)
    if predictor is not None:
        ref_values.update(ranker_predictions(reference, predictor, transform))
        rec_values.update(ranker_predictions(recent, predictor, transform))
        kinds.update({f"{PREDICTION_PREFIX}{task}": "prediction" for task in TASKS})

    def side(data: PreprocessLayout, split: str, days: list[int], rows: Columns) -> dict[str, Any]:
        return {"data_dir": str(data.root), "split": split, "days": days, "rows": len(rows["day"])}

    result = DriftResult(
        features=compare_samples(ref_values, rec_values, kinds, job.stats),
        config=job.stats,
        reference=side(reference_data, job.reference_split, ref_days, reference),
        recent=side(recent_data, job.recent_split, rec_days, recent),
        ranker=str(job.ranker_dir) if job.ranker_dir is not None else None,
    )
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drift.json").write_text(json.dumps(result.to_dict(), indent=2))
    write_drift_report(result, out / "drift.html")
    # For node-exporter's textfile collector: the FeatureDrift alert rule reads these.
    tmp = out / ".drift.prom.tmp"
    tmp.write_text(prometheus_text(result))
    tmp.replace(out / "drift.prom")  # the collector must never read a half-written file
    return result


def prometheus_text(result: DriftResult) -> str:
    """``feedrec_drift_psi{feature, kind}`` and ``feedrec_drift_ks{feature}`` in Prometheus'
    text exposition format (apps/feed_service/monitoring/alerts.yml alerts on the PSI)."""
    lines = [
        "# HELP feedrec_drift_psi Population stability index, recent vs reference sample.",
        "# TYPE feedrec_drift_psi gauge",
    ]
    for row in result.features:
        lines.append(f'feedrec_drift_psi{{feature="{row.name}",kind="{row.kind}"}} {row.psi:.6g}')
    lines += [
        "# HELP feedrec_drift_ks Two-sample Kolmogorov-Smirnov statistic (numeric features).",
        "# TYPE feedrec_drift_ks gauge",
    ]
    for row in result.features:
        if row.ks is not None:
            lines.append(f'feedrec_drift_ks{{feature="{row.name}"}} {row.ks:.6g}')
    return "\n".join(lines) + "\n"
