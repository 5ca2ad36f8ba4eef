"""The faiss index sweep: recall measured against exact search, the fastest good point chosen."""

from __future__ import annotations

import numpy as np

from feedrec.retrieval.index_sweep import QPS_TIE, recall_at_k, sweep_index
from feedrec.retrieval.post_index import PostIndex


def _clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_recall_at_k_counts_overlap_per_query() -> None:
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, -1], [5, 6, 7, 8]])
    assert recall_at_k(found, truth) == (2 / 4 + 4 / 4) / 2


def test_chosen_point_reaches_the_target_and_is_the_fastest_that_does() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 16))
    x, q = _clustered(20_000, rng, centres), _clustered(100, rng, centres)
    result = sweep_index(x, q, k=10, target_recall=0.9)
    assert result.chosen.recall >= 0.9
    good = [p for p in result.points if p.recall >= 0.9]
    fastest = max(p.qps for p in good)
    # Fastest up to a tie in speed; of the tied points, the most accurate.
    tied = [p for p in good if p.qps >= (1 - QPS_TIE) * fastest]
    assert result.chosen in tied and result.chosen.recall == max(p.recall for p in tied)
    # The returned index is set to the chosen parameters: its recall is what was measured.
    exact = PostIndex.build(x, np.arange(len(x)))[0]
    _, truth = exact.search(q, 10)
    _, rows = result.index.search(q, 10)
    assert abs(recall_at_k(rows, truth) - result.chosen.recall) < 1e-9


def test_unreachable_target_falls_back_to_exact_search() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3_000, 16)).astype(np.float32)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    result = sweep_index(x, q, k=10, target_recall=1.01, factories=["HNSW32"])
    assert result.chosen.factory == "Flat" and result.chosen.recall == 1.0
    assert result.index.ntotal == len(x)


def test_fast_scan_index_is_refined_and_keeps_its_parameters_on_disk(tmp_path) -> None:
    # Diffuse clusters, as the ANN benchmark's (noise as large as the centres): the case the
    # compressed scan is for.
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((200, 16))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def diffuse(n: int) -> np.ndarray:
        x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, 16)) / 4
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    x, q = diffuse(40_000), diffuse(100)
    factory = "IVF800,PQ16x4fs,RFlat"  # 4 * sqrt(40,000) lists, one 4-bit code a dimension
    result = sweep_index(x, q, k=10, target_recall=0.8, factories=[factory])
    assert result.chosen.factory == factory and result.chosen.recall >= 0.8
    assert set(result.chosen.params) == {"k_factor", "nprobe"}
    # Each re-ranking factor walks nprobe upward from 1.
    assert {p.params["k_factor"] for p in result.points} == {2, 4, 8}
    # Saved and loaded, the index searches with the chosen parameters: the same rows.
    built = PostIndex(result.index, np.arange(len(x)))
    built.save(tmp_path / "index.faiss", tmp_path / "ids.npy")
    loaded = PostIndex.load(tmp_path / "index.faiss", tmp_path / "ids.npy")
    np.testing.assert_array_equal(loaded.search(q, 10)[1], built.search(q, 10)[1])
