"""Choose a faiss index and its search parameters by measurement, not by folklore.

For a corpus ``x`` [P, E] (unit vectors, inner product) and sample queries [Q, E],
:func:`sweep_index` builds a few approximate indexes (IVF-Flat and HNSW at several sizes),
walks each one's speed knob (``nprobe`` / ``efSearch``) upward, and measures recall@k against
exact search plus queries per second (batched, on this machine's threads). The chosen point is
the fastest one whose recall reaches ``target_recall``; the exact index wins when nothing does.

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
    params: dict[str, int]  # search-time parameters, e.g. {"nprobe": 32}
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


def _candidates(n: int) -> Iterator[tuple[str, str, list[int]]]:
    """(factory, knob, knob values) to try for a corpus of ``n`` vectors."""
    for nlist in sorted({int(4 * np.sqrt(n)), int(8 * np.sqrt(n))}):
        if nlist * 39 <= n:  # faiss wants >= 39 training points per list
            yield f"IVF{nlist},Flat", "nprobe", [2**i for i in range(11) if 2**i <= nlist]
    # efSearch below k cannot return k results in order; start there.
    yield "HNSW32", "efSearch", [128, 192, 256, 384, 512, 768, 1024, 1536]


def _set(index: faiss.Index, knob: str, value: int) -> None:
    if knob == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value
    else:  # ParameterSpace reaches through the index wrappers to the HNSW graph
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", value)


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
    for factory, knob, values in _candidates(len(x)):
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
        for value in values:
            _set(index, knob, value)
            rows, qps = _timed_search(index, q, k)
            point = SweepPoint(factory, {knob: value}, recall_at_k(rows, truth), qps, build_s)
            points.append(point)
            if progress:
                print(
                    f"  {factory:>14} {knob}={value:<4} recall@{k}={point.recall:.4f} "
                    f"qps={qps:,.0f} ({qps / exact_qps:.1f}x exact)",
                    flush=True,
                )
            if point.recall >= target_recall:
                break  # higher values only trade speed for recall we do not need
    good = [p for p in points if p.recall >= target_recall]
    if good:
        chosen = max(good, key=lambda p: p.qps)
        index = built[chosen.factory]
        _set(index, *next(iter(chosen.params.items())))
    else:
        chosen = SweepPoint("Flat", {}, 1.0, exact_qps, 0.0)
        index = exact
    return SweepResult(points, chosen, exact_qps, k, target_recall, index)
