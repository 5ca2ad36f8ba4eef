"""Capacity plan for a target DAU: replicas, GPUs, memory, shards, training hours and cost.

The plan scales measured per-replica numbers (``bench/results/serve.json`` and ``train.json``,
written by ``make bench-serve``, ``make bench-ann`` and ``make bench-train``) by the stated
assumptions of `CapacityAssumptions`. Every number in it is a `Quantity` that says where it
came from:

- ``measured``: a bench file and the key in it (``serve.json: ann.qps``);
- ``assumed``: a `CapacityAssumptions` field, listed with its reason in the document;
- ``derived``: a formula over earlier quantities (``avg_rps * peak_to_average``). The formula
  text *is* the computation (a small arithmetic evaluator runs it), so the document cannot say
  one thing while the code computes another.

A "replica" of a CPU stage is what the bench measured: the bench host's cores (2 here) running
that stage. GPU stages are sized as one GPU = ``*_gpu_speedup`` measured replicas.

Example::

    measured = load_measurements(Path("bench/results"))
    plan = plan_capacity(CapacityAssumptions(dau=500_000_000), measured)
    write_capacity_doc(plan, Path("docs/capacity.md"), command="feedrec capacity")
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["measured", "assumed", "derived"]


class BenchFileError(ValueError):
    """A bench result file is missing, not JSON, or lacks a usable key (the message names both)."""


@dataclass(frozen=True)
class Quantity:
    """One number of the plan and its provenance.

    Args:
        name: identifier, used by formulas and shown in the document.
        value: the number, in ``unit``.
        unit: e.g. ``req/s``, ``GiB``, ``USD/day``.
        kind: measured, assumed or derived.
        source: ``"<file>: <key>"`` (measured), the field name (assumed) or the formula (derived).
        label: what it is, in words.
    """

    name: str
    value: float
    unit: str
    kind: Kind
    source: str
    label: str


# --- assumptions -------------------------------------------------------------------------------

# How __post_init__ checks a field; the error names the field and the rule.
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
    "positive": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "fraction": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "factor": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
    "exponent": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "hours": (lambda v: _is_number(v) and 0 < v <= 24, "hours in (0, 24]"),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _a(default: float, check: str, unit: str, note: str) -> Any:
    return field(default=default, metadata={"check": check, "unit": unit, "note": note})


@dataclass(frozen=True)
class CapacityAssumptions:
    """Everything the plan assumes rather than measures; each field's note says why.

    Sizes are counts (users, posts, vectors), widths in floats per row, memory in GiB (2**30
    bytes), throughput factors relative to one measured bench replica, prices in USD per hour.
    """

    # Traffic
    dau: int = _a(500_000_000, "count", "users/day", "daily active users (`--dau`)")
    requests_per_user_per_day: float = _a(
        20.0, "positive", "req/user/day", "feed page loads per active user per day"
    )
    peak_to_average: float = _a(
        2.0, "factor", "x", "peak-hour request rate over the daily mean (diurnal peak)"
    )
    impressions_per_request: float = _a(
        10.0,
        "positive",
        "impressions/req",
        "posts a user actually sees per page load; each is one logged training example",
    )
    # Candidates per stage
    retrieve_candidates: int = _a(
        1000, "count", "posts/req", "ANN top-k per request, as in the serve bench"
    )
    rank_candidates: int = _a(
        500, "count", "posts/req", "candidates the ranker scores per request, as in the bench"
    )
    # Where the measured chain's CPU goes (the serve bench measures the whole chain)
    ingress_cpu_share: float = _a(
        0.25,
        "fraction",
        "share",
        "of the measured chain's CPU: HTTP proxy, Ingress, re-ranking (README's low-load split: "
        "retrieval ~14 ms and ranking ~29 ms of a ~60 ms request; the rest is hops and ingress)",
    )
    retrieval_cpu_share: float = _a(
        0.25, "fraction", "share", "of the chain's CPU: user tower, ANN call, filters"
    )
    ranking_cpu_share: float = _a(
        0.50, "fraction", "share", "of the chain's CPU: feature assembly and the Triton ranker"
    )
    # Tables and index
    users: int = _a(
        500_000_000,
        "count",
        "rows",
        "rows of the user-id table (every account; at least `dau`)",
    )
    posts: int = _a(10_000_000_000, "count", "rows", "rows of the post-id table (every post)")
    user_dim: int = _a(64, "count", "floats/row", "user-id embedding width (the demo uses 32)")
    post_dim: int = _a(64, "count", "floats/row", "post-id embedding width (the demo uses 32)")
    serving_bytes_per_value: int = _a(2, "count", "bytes", "fp16 embeddings at serving")
    training_bytes_per_value: int = _a(4, "count", "bytes", "fp32 embeddings in training")
    optimizer_bytes_per_row: int = _a(
        4, "count", "bytes/row", "row-wise Adagrad state: one fp32 per row (the fused optimizer)"
    )
    index_posts: int = _a(
        1_000_000_000,
        "count",
        "vectors",
        "posts in the ANN index: the recent, eligible tenth of all posts (a suggested feed "
        "serves fresh posts; older ones stay in the ranker's table)",
    )
    index_bytes_per_vector: int = _a(
        264,
        "count",
        "bytes",
        "IVF-Flat, as on GPU: 64 fp32 values + an 8-byte id (PQ codes would cut it ~4-8x, at "
        "a recall not measured here)",
    )
    ann_cost_exponent: float = _a(
        0.5,
        "exponent",
        "",
        "a shard query costs (vectors per shard / bench corpus)^e of a bench query: IVF lists "
        "grow as sqrt(N) at fixed nprobe (faiss guideline; IVF4000-8000 for 1M in the bench), so "
        "e = 0.5; e = 1 is a linear scan. Recall at shard size is not measured",
    )
    index_shard_gib: float = _a(
        16.0,
        "positive",
        "GiB",
        "ANN shard size bound: one shard per GPU, leaving room for query batches",
    )
    embedding_shard_gib: float = _a(
        24.0,
        "positive",
        "GiB",
        "serving embedding shard size bound, one shard per CPU node (32 GiB node)",
    )
    embedding_replicas: int = _a(
        2,
        "count",
        "copies",
        "copies of each serving embedding shard (one spare); lookup throughput not measured",
    )
    # Hardware (cluster.yaml's node types)
    gpu_memory_gib: float = _a(24.0, "positive", "GiB", "one A10G (cluster.yaml g5.2xlarge)")
    gpu_memory_usable: float = _a(
        0.8, "fraction", "share", "of GPU memory for tables / index (rest: activations, buffers)"
    )
    gpus_per_node: int = _a(1, "count", "GPUs/node", "g5.2xlarge has one GPU")
    cpu_node_cpus: int = _a(16, "count", "cores/node", "c6i.4xlarge (cluster.yaml cpu_worker)")
    cpu_node_memory_gib: float = _a(32.0, "positive", "GiB", "c6i.4xlarge")
    # GPU speed-ups over one measured CPU replica (explicit guesses, not measurements)
    ranking_gpu_speedup: float = _a(
        50.0,
        "factor",
        "x",
        "one GPU ranks like this many measured replicas. Public Triton DLRM numbers: V100 "
        "1.49M samples/s vs ~117k on 40 CPU cores, ~250x two cores on the model alone; 50 because "
        "feature assembly stays on CPU",
    )
    ann_gpu_speedup: float = _a(
        15.0,
        "factor",
        "x",
        "one GPU searches like this many measured replicas: faiss GPU IVF16384,Flat nprobe 64 "
        "on SIFT1M scans ~48G floats/s vs ~3.2G/s in the bench (783.7 QPS x 64k vectors x 64)",
    )
    training_gpu_speedup: float = _a(
        15.0,
        "factor",
        "x",
        "one GPU trains like this many measured replicas: TorchRec DLRM ~740k samples/s on an "
        "A100, an A10G about a third of that, vs 14.5k on the bench's 2 cores",
    )
    training_scaling_efficiency: float = _a(
        0.8, "fraction", "share", "per-GPU throughput kept across the training GPUs"
    )
    training_epochs: int = _a(1, "count", "passes", "passes over each day of logs")
    training_window_hours: float = _a(
        6.0, "hours", "h", "a day of logs must train within this (daily retrain with slack)"
    )
    target_utilisation: float = _a(
        0.6,
        "fraction",
        "share",
        "peak load over measured replica capacity (headroom for failover and spikes; the "
        "measured capacity is already at p99 <= 100 ms)",
    )
    cpu_node_hour_usd: float = _a(
        0.68, "positive", "USD/h", "c6i.4xlarge on-demand, us-west-2 list price (check current)"
    )
    gpu_node_hour_usd: float = _a(
        1.212, "positive", "USD/h", "g5.2xlarge on-demand, us-west-2 list price (check current)"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            ok, rule = _CHECKS[f.metadata["check"]]
            value = getattr(self, f.name)
            if not ok(value):
                raise ValueError(f"CapacityAssumptions.{f.name} must be {rule}, got {value!r}")
        shares = self.ingress_cpu_share + self.retrieval_cpu_share + self.ranking_cpu_share
        if abs(shares - 1.0) > 1e-6:
            raise ValueError(
                "CapacityAssumptions.ingress_cpu_share + retrieval_cpu_share + ranking_cpu_share "
                f"must sum to 1, got {shares:g}"
            )
        self._at_most("users", "dau", "a user-table row per daily active user")
        self._at_most("posts", "index_posts", "the index holds a subset of the posts")
        self._at_most("retrieve_candidates", "rank_candidates", "the ranker scores retrieved posts")
        usable = self.gpu_memory_gib * self.gpu_memory_usable
        if self.index_shard_gib > usable:
            raise ValueError(
                f"CapacityAssumptions.index_shard_gib ({self.index_shard_gib:g}) must fit one "
                f"GPU: <= gpu_memory_gib * gpu_memory_usable = {usable:g}"
            )
        if self.embedding_shard_gib > self.cpu_node_memory_gib:
            raise ValueError(
                f"CapacityAssumptions.embedding_shard_gib ({self.embedding_shard_gib:g}) must fit "
                f"one CPU node: <= cpu_node_memory_gib = {self.cpu_node_memory_gib:g}"
            )

    def _at_most(self, big: str, small: str, why: str) -> None:
        if getattr(self, small) > getattr(self, big):
            raise ValueError(
                f"CapacityAssumptions.{small} ({getattr(self, small):,}) must be <= {big} "
                f"({getattr(self, big):,}): {why}"
            )

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any]) -> CapacityAssumptions:
        """The defaults with ``overrides`` applied (CLI ``--set`` values, already JSON-parsed).

        Integral floats are accepted for int fields (``5e8``); unknown names are refused.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            if name not in fields:
                raise ValueError(f"unknown assumption {name!r}; known: {', '.join(sorted(fields))}")
            is_int = fields[name].metadata["check"] == "count"
            if is_int and isinstance(value, float) and value.is_integer():
                value = int(value)
            values[name] = value
        return cls(**values)


# --- measurements ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Measured:
    name: str
    file: str
    key: str  # dotted path into the JSON
    unit: str
    label: str
    make: str  # the target that writes it


MEASURED: tuple[_Measured, ...] = (
    _Measured(
        "chain_rps",
        "serve.json",
        "rps_at_p99_100ms",
        "req/s per replica",
        "Serve chain (Ingress + Triton ranker, Retrieval) at p99 <= 100 ms",
        "make bench-serve",
    ),
    _Measured(
        "serve_replica_cpus",
        "serve.json",
        "host.cpus",
        "cores",
        "cores of the serve bench host: one measured replica",
        "make bench-serve",
    ),
    _Measured(
        "bench_retrieve_k",
        "serve.json",
        "workload.retrieve_k",
        "posts/req",
        "candidates retrieved per request in the serve bench",
        "make bench-serve",
    ),
    _Measured(
        "bench_rank_k",
        "serve.json",
        "workload.rank_k",
        "posts/req",
        "candidates ranked per request in the serve bench",
        "make bench-serve",
    ),
    _Measured(
        "ann_qps",
        "serve.json",
        "ann.ivf_flat.qps",
        "queries/s per replica",
        "fastest IVF-Flat point at recall@100 >= 0.95, top-100 (GPU faiss searches IVF-Flat; "
        "the CPU sweep's fast-scan pick, `ann.qps`, has no GPU kernel)",
        "make bench-ann",
    ),
    _Measured(
        "ann_bench_vectors",
        "serve.json",
        "ann.corpus.posts",
        "vectors",
        "vectors in the ANN bench index",
        "make bench-ann",
    ),
    _Measured(
        "ann_recall_at_100",
        "serve.json",
        "ann.ivf_flat.recall_at_100",
        "",
        "recall@100 of that IVF-Flat point vs exact search",
        "make bench-ann",
    ),
    _Measured(
        "train_samples_per_s",
        "train.json",
        "ray_dmp_samples_per_s",
        "samples/s per replica",
        "Ray Train + TorchRec DMP ranker training, 2 workers",
        "make bench-train",
    ),
)


def load_measurements(bench_dir: Path) -> tuple[Quantity, ...]:
    """The measured per-replica numbers the plan scales, read from ``bench_dir/*.json``.

    Raises:
        BenchFileError: naming the file (and key) that is missing, not JSON, or not a positive
            number, and the make target that writes it.
    """
    docs: dict[str, Any] = {}
    out = []
    for m in MEASURED:
        path = Path(bench_dir) / m.file
        if m.file not in docs:
            try:
                docs[m.file] = json.loads(path.read_text())
            except FileNotFoundError:
                raise BenchFileError(f"{path}: not found (run `{m.make}`)") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BenchFileError(f"{path}: not valid JSON ({e})") from None
        node: Any = docs[m.file]
        for part in m.key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise BenchFileError(f"{path}: key {m.key!r} missing (run `{m.make}`)")
            node = node[part]
        if not _is_number(node) or node <= 0:
            raise BenchFileError(f"{path}: key {m.key!r} must be a number > 0, got {node!r}")
        out.append(Quantity(m.name, float(node), m.unit, "measured", f"{path}: {m.key}", m.label))
    return tuple(out)


# --- the plan ----------------------------------------------------------------------------------

_BINOPS: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_FUNCS: dict[str, Callable[..., float]] = {"ceil": math.ceil, "max": max, "min": min}


def evaluate(formula: str, env: Mapping[str, float]) -> float:
    """Arithmetic over named quantities: ``+ - * / **``, numbers, ``ceil``, ``max``, ``min``."""

    def ev(node: ast.expr) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise KeyError(f"formula {formula!r}: no quantity named {node.id!r}")
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return float(_BINOPS[type(node.op)](ev(node.left), ev(node.right)))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS
            and not node.keywords
        ):
            return float(_FUNCS[node.func.id](*(ev(a) for a in node.args)))
        raise ValueError(f"formula {formula!r}: unsupported expression {ast.unparse(node)!r}")

    return ev(ast.parse(formula, mode="eval").body)


@dataclass(frozen=True)
class PlanSection:
    """A stage (or traffic, cost) of the plan: its derived quantities, in computation order."""

    title: str
    note: str
    quantities: tuple[Quantity, ...]


@dataclass(frozen=True)
class CapacityPlan:
    """Measurements, assumptions and the derived plan; look numbers up by name."""

    assumptions: CapacityAssumptions
    measurements: tuple[Quantity, ...]
    assumed: tuple[Quantity, ...]
    sections: tuple[PlanSection, ...]

    def __getitem__(self, name: str) -> Quantity:
        for q in self.all():
            if q.name == name:
                return q
        raise KeyError(name)

    def value(self, name: str) -> float:
        return self[name].value

    def all(self) -> tuple[Quantity, ...]:
        derived = tuple(q for s in self.sections for q in s.quantities)
        return self.measurements + self.assumed + derived

    def cost_drivers(self) -> list[tuple[Quantity, float]]:
        """Daily cost components, largest first, each with its share of the total."""
        total = self.value("cost_per_day")
        parts = [q for q in self.all() if q.name in COST_PARTS]
        return sorted(((q, q.value / total) for q in parts), key=lambda p: -p[0].value)

    def summary(self) -> str:
        v = self.value
        top, share = self.cost_drivers()[0]
        return (
            f"{v('dau'):,.0f} DAU: peak {v('peak_rps'):,.0f} req/s; "
            f"ingress {v('ingress_replicas'):,.0f} + retrieval {v('retrieval_replicas'):,.0f} "
            f"CPU replicas; ranking {v('ranking_gpus'):,.0f} GPUs; ANN "
            f"{v('index_shards'):,.0f} shards x {v('ann_replicas_per_shard'):,.0f} = "
            f"{v('ann_gpus'):,.0f} GPUs; embeddings {v('embedding_gib_serving'):,.0f} GiB in "
            f"{v('embedding_shards'):,.0f} shards; training {v('train_gpus'):,.0f} GPUs, "
            f"{v('training_hours_per_day'):.1f} h per day of logs; "
            f"{v('cost_per_day'):,.0f} USD/day (largest: {top.label}, {share:.0%})"
        )


COST_PARTS = (
    "cost_ingress",
    "cost_retrieval",
    "cost_ann",
    "cost_ranking",
    "cost_embeddings",
    "cost_training",
)

# (section title, note, [(name, formula, unit, label)]), evaluated in order.
_PLAN: tuple[tuple[str, str, tuple[tuple[str, str, str, str], ...]], ...] = (
    (
        "Traffic",
        "",
        (
            ("requests_per_day", "dau * requests_per_user_per_day", "req/day", "feed requests"),
            ("avg_rps", "requests_per_day / 86400", "req/s", "mean request rate"),
            ("peak_rps", "avg_rps * peak_to_average", "req/s", "peak request rate"),
            (
                "impressions_per_day",
                "requests_per_day * impressions_per_request",
                "examples/day",
                "logged impressions (training examples)",
            ),
        ),
    ),
    (
        "Ingress (CPU)",
        "HTTP proxy, Ingress replica, re-ranking. One replica = the bench host's cores.",
        (
            (
                "ingress_rps_per_replica",
                "chain_rps / ingress_cpu_share",
                "req/s",
                "one replica's capacity for this stage alone",
            ),
            (
                "ingress_replicas",
                "ceil(peak_rps / (ingress_rps_per_replica * target_utilisation))",
                "replicas",
                "Ingress replicas at peak",
            ),
            ("ingress_cpus", "ingress_replicas * serve_replica_cpus", "cores", "cores"),
            ("ingress_nodes", "ceil(ingress_cpus / cpu_node_cpus)", "CPU nodes", "CPU nodes"),
        ),
    ),
    (
        "Retrieval (CPU)",
        "User tower, the call to every ANN shard, merging and filtering; cost grows with the "
        "candidates retrieved. The index search itself is sized under ANN index.",
        (
            (
                "retrieval_rps_per_replica",
                "chain_rps / retrieval_cpu_share * bench_retrieve_k / retrieve_candidates",
                "req/s",
                "one replica's capacity for this stage alone",
            ),
            (
                "retrieval_replicas",
                "ceil(peak_rps / (retrieval_rps_per_replica * target_utilisation))",
                "replicas",
                "Retrieval replicas at peak",
            ),
            ("retrieval_cpus", "retrieval_replicas * serve_replica_cpus", "cores", "cores"),
            ("retrieval_nodes", "ceil(retrieval_cpus / cpu_node_cpus)", "CPU nodes", "CPU nodes"),
        ),
    ),
    (
        "ANN index (GPU)",
        "Shards partition the index; every request queries every shard, so each shard needs "
        "replicas for the full peak rate. The bench measured top-100; top-1000 costs somewhat "
        "more per query (not measured).",
        (
            (
                "index_gib",
                "index_posts * index_bytes_per_vector / 2**30",
                "GiB",
                "index memory, one copy",
            ),
            ("index_shards", "ceil(index_gib / index_shard_gib)", "shards", "ANN index shards"),
            ("vectors_per_shard", "index_posts / index_shards", "vectors", "vectors per shard"),
            (
                "shard_query_cost",
                "(vectors_per_shard / ann_bench_vectors) ** ann_cost_exponent",
                "x bench query",
                "cost of one shard query relative to a bench query",
            ),
            (
                "ann_qps_per_gpu",
                "ann_qps * ann_gpu_speedup / shard_query_cost",
                "queries/s",
                "one GPU's shard queries per second",
            ),
            (
                "ann_replicas_per_shard",
                "ceil(peak_rps / (ann_qps_per_gpu * target_utilisation))",
                "replicas",
                "GPU replicas of each shard",
            ),
            ("ann_gpus", "index_shards * ann_replicas_per_shard", "GPUs", "ANN GPUs"),
            (
                "ann_memory_gib",
                "ann_gpus * index_gib / index_shards",
                "GiB",
                "GPU memory holding index shards, all replicas",
            ),
            ("ann_nodes", "ceil(ann_gpus / gpus_per_node)", "GPU nodes", "GPU nodes"),
        ),
    ),
    (
        "Ranking (GPU, Triton)",
        "The dense ranker on GPU; id embeddings are looked up in the embedding shards below. "
        "Cost grows with the candidates ranked.",
        (
            (
                "ranking_rps_per_gpu",
                "chain_rps / ranking_cpu_share * bench_rank_k / rank_candidates"
                " * ranking_gpu_speedup",
                "req/s",
                "one GPU's capacity",
            ),
            (
                "ranking_gpus",
                "ceil(peak_rps / (ranking_rps_per_gpu * target_utilisation))",
                "GPUs",
                "Triton ranking GPUs at peak",
            ),
            (
                "ranked_per_s",
                "peak_rps * rank_candidates",
                "candidates/s",
                "candidates scored per second at peak",
            ),
            ("ranking_nodes", "ceil(ranking_gpus / gpus_per_node)", "GPU nodes", "GPU nodes"),
        ),
    ),
    (
        "Embedding tables",
        "The ranker's user-id and post-id tables (the two-tower model has no id tables).",
        (
            (
                "embedding_gib_serving",
                "(users * user_dim + posts * post_dim) * serving_bytes_per_value / 2**30",
                "GiB",
                "tables at serving precision, one copy",
            ),
            (
                "embedding_shards",
                "ceil(embedding_gib_serving / embedding_shard_gib)",
                "shards",
                "serving shards (one per CPU node)",
            ),
            (
                "embedding_nodes",
                "embedding_shards * embedding_replicas",
                "CPU nodes",
                "CPU nodes serving lookups",
            ),
            (
                "embedding_gib_training",
                "((users * user_dim + posts * post_dim) * training_bytes_per_value"
                " + (users + posts) * optimizer_bytes_per_row) / 2**30",
                "GiB",
                "tables + optimizer state in training",
            ),
            (
                "train_gpus_for_memory",
                "ceil(embedding_gib_training / (gpu_memory_gib * gpu_memory_usable))",
                "GPUs",
                "GPUs whose memory holds the sharded tables",
            ),
        ),
    ),
    (
        "Training",
        "One day of logs per day; the GPU count is the larger of what holds the tables and what "
        "meets the window.",
        (
            (
                "samples_per_day",
                "impressions_per_day * training_epochs",
                "samples/day",
                "training samples per day of logs",
            ),
            (
                "train_samples_per_s_per_gpu",
                "train_samples_per_s * training_gpu_speedup",
                "samples/s",
                "one GPU's training throughput",
            ),
            (
                "train_gpus_for_window",
                "ceil(samples_per_day / (train_samples_per_s_per_gpu"
                " * training_scaling_efficiency * training_window_hours * 3600))",
                "GPUs",
                "GPUs that finish a day within the window",
            ),
            (
                "train_gpus",
                "max(train_gpus_for_memory, train_gpus_for_window)",
                "GPUs",
                "training GPUs",
            ),
            (
                "training_hours_per_day",
                "samples_per_day / (train_samples_per_s_per_gpu * training_scaling_efficiency"
                " * train_gpus) / 3600",
                "h",
                "hours to train one day of logs",
            ),
            ("train_nodes", "ceil(train_gpus / gpus_per_node)", "GPU nodes", "GPU nodes"),
        ),
    ),
    (
        "Cost",
        "Serving provisioned for the peak around the clock (an upper bound: autoscaling lowers "
        "it off-peak); training billed for its hours. Head node and storage left out.",
        (
            ("cost_ingress", "ingress_nodes * 24 * cpu_node_hour_usd", "USD/day", "Ingress"),
            (
                "cost_retrieval",
                "retrieval_nodes * 24 * cpu_node_hour_usd",
                "USD/day",
                "Retrieval",
            ),
            ("cost_ann", "ann_nodes * 24 * gpu_node_hour_usd", "USD/day", "ANN index"),
            ("cost_ranking", "ranking_nodes * 24 * gpu_node_hour_usd", "USD/day", "Ranking"),
            (
                "cost_embeddings",
                "embedding_nodes * 24 * cpu_node_hour_usd",
                "USD/day",
                "Embedding serving",
            ),
            (
                "cost_training",
                "train_nodes * training_hours_per_day * gpu_node_hour_usd",
                "USD/day",
                "Training",
            ),
            (
                "cost_per_day",
                "cost_ingress + cost_retrieval + cost_ann + cost_ranking + cost_embeddings"
                " + cost_training",
                "USD/day",
                "total",
            ),
            ("cost_per_month", "cost_per_day * 30", "USD/month", "total, 30 days"),
        ),
    ),
)


def plan_capacity(
    assumptions: CapacityAssumptions, measurements: tuple[Quantity, ...]
) -> CapacityPlan:
    """Derive every stage's replicas, GPUs, memory, shards, training hours and cost."""
    assumed = tuple(
        Quantity(
            f.name,
            float(getattr(assumptions, f.name)),
            f.metadata["unit"],
            "assumed",
            f.name,
            f.metadata["note"],
        )
        for f in dataclasses.fields(assumptions)
    )
    env = {q.name: q.value for q in (*measurements, *assumed)}
    sections = []
    for title, note, rows in _PLAN:
        quantities = []
        for name, formula, unit, label in rows:
            env[name] = evaluate(formula, env)
            quantities.append(Quantity(name, env[name], unit, "derived", formula, label))
        sections.append(PlanSection(title, note, tuple(quantities)))
    return CapacityPlan(assumptions, measurements, assumed, tuple(sections))


# --- the document ------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    """Whole numbers and anything >= 1000 without decimals, the rest to 4 significant digits."""
    if v.is_integer() or abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _headline(plan: CapacityPlan) -> list[str]:
    v = plan.value
    top, share = plan.cost_drivers()[0]
    rows = [
        ("peak feed requests", f"{_fmt(v('peak_rps'))} req/s", "peak_rps"),
        (
            f"Ingress replicas ({_fmt(v('serve_replica_cpus'))} cores each)",
            f"{_fmt(v('ingress_replicas'))} ({_fmt(v('ingress_nodes'))} CPU nodes)",
            "ingress_replicas",
        ),
        (
            f"Retrieval replicas ({_fmt(v('serve_replica_cpus'))} cores each)",
            f"{_fmt(v('retrieval_replicas'))} ({_fmt(v('retrieval_nodes'))} CPU nodes)",
            "retrieval_replicas",
        ),
        ("Ranking (Triton) GPUs", _fmt(v("ranking_gpus")), "ranking_gpus"),
        (
            "ANN index",
            f"{_fmt(v('index_gib'))} GiB in {_fmt(v('index_shards'))} shards x "
            f"{_fmt(v('ann_replicas_per_shard'))} replicas = {_fmt(v('ann_gpus'))} GPUs",
            "ann_gpus",
        ),
        (
            "embedding tables (serving)",
            f"{_fmt(v('embedding_gib_serving'))} GiB in {_fmt(v('embedding_shards'))} shards x "
            f"{_fmt(v('embedding_replicas'))} copies",
            "embedding_nodes",
        ),
        (
            "training",
            f"{_fmt(v('train_gpus'))} GPUs, {_fmt(v('training_hours_per_day'))} h per day of logs "
            f"({_fmt(v('samples_per_day'))} samples)",
            "training_hours_per_day",
        ),
        (
            "cost",
            f"{_fmt(v('cost_per_day'))} USD/day, {_fmt(v('cost_per_month'))} USD/month; largest: "
            f"{top.label} ({share:.0%})",
            "cost_per_day",
        ),
    ]
    out = ["| | plan | row |", "|---|---|---|"]
    out += [f"| {a} | {b} | `{c}` |" for a, b, c in rows]
    return out


def render_markdown(plan: CapacityPlan, command: str) -> str:
    """``docs/capacity.md``: headline, measurements, assumptions, one table per stage, costs."""
    a = plan.assumptions
    lines = [
        f"# Capacity plan: {a.dau:,} daily active users",
        "",
        f"Generated by `{command}`; run it again after `make bench`. Every number below is "
        "**measured** (a bench file and key), **assumed** (a line of the assumptions list) or "
        "**derived** by the formula in its row, whose names are measurements, assumptions or "
        "rows above it (the formula text is what computes the value: "
        "`libs/feedrec/planning/capacity_plan.py`).",
        "",
        "## Headline",
        "",
        *_headline(plan),
        "",
        "## Measurements (per replica on the bench host)",
        "",
        "| name | value | unit | source | what |",
        "|---|---|---|---|---|",
    ]
    for q in plan.measurements:
        lines.append(f"| `{q.name}` | {_fmt(q.value)} | {q.unit} | `{q.source}` | {q.label} |")
    lines += ["", "## Assumptions", ""]
    for q in plan.assumed:
        unit = q.unit if q.unit in ("x", "") else f" {q.unit}"  # 2x, but 20 req/user/day
        lines.append(f"- `{q.name}` = {_fmt(q.value)}{unit}: {q.label}")
    for section in plan.sections:
        lines += ["", f"## {section.title}", ""]
        if section.note:
            lines += [section.note, ""]
        lines += ["| name | value | unit | = | what |", "|---|---|---|---|---|"]
        for q in section.quantities:
            lines.append(
                f"| `{q.name}` | {_fmt(q.value)} | {q.unit} | `{_cell(q.source)}` | {q.label} |"
            )
    lines += ["", "## Cost drivers", "", "| component | USD/day | share | row |"]
    lines.append("|---|---|---|---|")
    for q, share in plan.cost_drivers():
        lines.append(f"| {q.label} | {_fmt(q.value)} | {share:.0%} | `{q.name}` |")
    lines += [
        "",
        "## Limits of this plan",
        "",
        "- The serve bench measures the whole chain on 2 shared cores with the load generator "
        "on them; the per-stage split is the `*_cpu_share` assumptions, not a measurement.",
        "- GPU numbers are the measured CPU numbers times the `*_gpu_speedup` assumptions; no GPU "
        "was measured.",
        "- ANN recall is measured on 1M clustered vectors only; at shard size it is assumed to "
        "hold with the `ann_cost_exponent` scaling.",
        "- The ANN operating point measured on diffuse synthetic clusters (the `ann` section "
        "of serve.json: many lists probed for recall@100 0.95) drives the ANN cost; trained "
        "item embeddings, PQ codes (`index_bytes_per_vector`), CPU replicas with fast-scan "
        "codes (the CPU sweep's pick, `ann.qps` in serve.json) or larger GPUs (fewer, larger "
        "shards) are the levers to measure next.",
        "- Embedding lookups, storage, the head node and network are not sized.",
        "",
    ]
    return "\n".join(lines)


def write_capacity_doc(plan: CapacityPlan, path: Path, command: str) -> Path:
    """Write `render_markdown` to ``path`` (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_markdown(plan, command))
    return path
