"""Choose a faiss index and its search parameters by measurement, not by folklore.

For a corpus ``x`` [P, E] (unit vectors, inner product) and sample queries [Q, E],
:func:`sweep_index` builds a few approximate indexes (IVF-Flat at two list counts, IVF with
4-bit fast-scan PQ plus exact re-ranking, HNSW), walks each one's speed knobs (``nprobe`` at
each re-ranking ``k_factor``, ``efSearch``) upward, and measures recall@k against
exact search plus queries per second (batched, on this machine's threads). The chosen point is
the fastest one whose recall reaches ``target_recall`` (of near ties in speed, the most
accurate); the exact index wins when nothing does.

Used by the index job for large corpora and by ``bench/ann.py`` (1M x 64).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np


@dataclass(frozen=True)
class SweepPoint:
    """One (index, search parameter) setting and what it measured."""

    factory: str  # faiss index_factory string, e.g. "IVF4096,Flat", "HNSW32", "Flat"
    params: dict[str, int]  # search-time parameters, e.g. {"nprobe": 32, "k_factor": 4}
    recall: float  # mean recall@k vs exact search over the queries
    qps: float  # queries per second, batched search
    build_s: float  # train + add time of the index

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class SweepResult:
    """All points, the chosen one, and the exact search baseline."""

    points: list[SweepPoint]
    chosen: SweepPoint
    exact_qps: float
    k: int
    target_recall: float
    index: faiss.Index = field(repr=False)  # the chosen index, built and with params set

    @property
    def speedup(self) -> float:
        return self.chosen.qps / self.exact_qps


def _timed_search(index: faiss.Index, q: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(rows [Q, k], queries per second); best of two runs (the first warms caches)."""
    best, rows = float("inf"), np.zeros((0, k), np.int64)
    for _ in range(2):
        t0 = time.perf_counter()
        _, rows = index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    return rows, len(q) / best


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean |found_i ∩ truth_i| / k over queries; both [Q, k] row ids (-1 = none)."""
    k = truth.shape[1]
    hits = [
        len(np.intersect1d(f[f >= 0], t[t >= 0], assume_unique=True))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits) / k)


#: Relative QPS difference below which two sweep points count as equally fast.
QPS_TIE = 0.05

#: Knob values walked upward: powers of two and the midpoints between them (1, 2, 3, 4, 6, 8,
#: 12, ...), so a chosen point is within 1.5x of the cheapest one that reaches the target.
_LADDER = sorted({v for i in range(12) for v in (2**i, 3 * 2**i // 2) if v >= 1})

#: Refinement factors tried for compressed indexes: the compressed scan keeps
#: ``k_factor * k`` candidates, which exact inner products then re-rank.
_K_FACTORS = (2, 4, 8)


def _candidates(n: int, dim: int) -> Iterator[tuple[str, list[list[dict[str, int]]]]]:
    """(factory, ladders) to try for a corpus of ``n`` vectors of ``dim``: each ladder is a
    list of search parameters walked upward until the recall target is met."""
    for nlist in sorted({int(4 * np.sqrt(n)), int(8 * np.sqrt(n))}):
        if nlist * 39 <= n:  # faiss wants >= 39 training points per list
            nprobes = [v for v in _LADDER if v <= nlist]
            yield f"IVF{nlist},Flat", [[{"nprobe": v} for v in nprobes]]
    nlist = int(4 * np.sqrt(n))
    if nlist * 39 <= n and dim % 2 == 0:
        # 4-bit PQ with one sub-quantizer per dimension, scanned in SIMD registers (faiss
        # "fast scan": dim/2 bytes a vector instead of 4*dim), then the best k_factor*k
        # re-ranked exactly: on diffuse embeddings IVF-Flat must scan so many lists that
        # its memory bandwidth, not the list count, bounds the speed-up.
        nprobes = [v for v in _LADDER if v <= nlist]
        yield (
            f"IVF{nlist},PQ{dim}x4fs,RFlat",
            [[{"k_factor": f, "nprobe": v} for v in nprobes] for f in _K_FACTORS],
        )
    # efSearch below k cannot return k results in order; start there.
    yield "HNSW32", [[{"efSearch": v} for v in (128, 192, 256, 384, 512, 768, 1024, 1536)]]


def _set(index: faiss.Index, params: dict[str, int]) -> None:
    for name, value in params.items():
        if name == "nprobe":  # reaches through the refinement wrapper to the IVF index
            faiss.extract_index_ivf(index).nprobe = value
        else:  # ParameterSpace reaches the HNSW graph and the refinement wrapper by name
            name = {"k_factor": "k_factor_rf"}.get(name, name)
            faiss.ParameterSpace().set_index_parameter(index, name, value)


def fastest_reaching(points: list[SweepPoint], target_recall: float) -> SweepPoint | None:
    """The fastest point whose recall reaches ``target_recall`` (None if none does). Speeds
    within ``QPS_TIE`` of the fastest are a tie (runs on a shared host differ more than that):
    of those, the most accurate."""
    good = [p for p in points if p.recall >= target_recall]
    if not good:
        return None
    fastest = max(p.qps for p in good)
    return max((p for p in good if p.qps >= (1 - QPS_TIE) * fastest), key=lambda p: p.recall)


def sweep_index(
    x: np.ndarray,
    queries: np.ndarray,
    *,
    k: int = 100,
    target_recall: float = 0.95,
    factories: list[str] | None = None,
    progress: bool = False,
) -> SweepResult:
    """Measure and choose (see module doc). ``factories`` restricts the families tried.

    Args:
        x: float32 [P, E] corpus (unit vectors).
        queries: float32 [Q, E] sample queries (user embeddings), Q ~ 1000.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    dim = x.shape[1]
    exact = faiss.IndexFlatIP(dim)
    exact.add(x)
    truth, exact_qps = _timed_search(exact, q, k)
    points: list[SweepPoint] = []
    built: dict[str, faiss.Index] = {}
    for factory, ladders in _candidates(len(x), dim):
        if factories is not None and factory not in factories:
            continue
        t0 = time.perf_counter()
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        if index.is_trained:  # HNSW: nothing to train
            index.add(x)
        else:  # IVF: 40 points per list are plenty for k-means (faiss warns below 39)
            nlist = faiss.extract_index_ivf(index).nlist
            sample = np.random.default_rng(0).choice(len(x), min(len(x), 40 * nlist), False)
            index.train(x[np.sort(sample)])
            index.add(x)
        build_s = time.perf_counter() - t0
        built[factory] = index
        for ladder in ladders:
            for params in ladder:
                _set(index, params)
                rows, qps = _timed_search(index, q, k)
                point = SweepPoint(factory, params, recall_at_k(rows, truth), qps, build_s)
                points.append(point)
                if progress:
                    knobs = " ".join(f"{name}={value}" for name, value in params.items())
                    print(
                        f"  {factory:>22} {knobs:<22} recall@{k}={point.recall:.4f} "
                        f"qps={qps:,.0f} ({qps / exact_qps:.1f}x exact)",
                        flush=True,
                    )
                if point.recall >= target_recall:
                    break  # higher values only trade speed for recall we do not need
    best = fastest_reaching(points, target_recall)
    if best is not None:
        chosen, index = best, built[best.factory]
        _set(index, chosen.params)
    else:
        chosen = SweepPoint("Flat", {}, 1.0, exact_qps, 0.0)
        index = exact
    return SweepResult(points, chosen, exact_qps, k, target_recall, index)
