"""A faiss inner-product index over item-tower embeddings of posts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from feedrec.retrieval.index_sweep import SweepResult, sweep_index

#: Below this many posts an exact index is both fast and exact; above it, IVF.
EXACT_MAX_POSTS = 200_000


@dataclass
class PostIndex:
    """faiss index + the post id of each index row.

    Args:
        index: a faiss index over unit vectors (inner product = cosine).
        post_ids: int64 [P] post id of row i.
    """

    index: faiss.Index
    post_ids: np.ndarray

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        post_ids: np.ndarray,
        *,
        nprobe: int = 64,
        queries: np.ndarray | None = None,
        target_recall: float = 0.95,
    ) -> tuple[PostIndex, SweepResult | None]:
        """Exact inner product for small corpora; for large ones, the index and search
        parameters chosen by :func:`sweep_index` on ``queries`` (sample user embeddings), or
        IVF-Flat (sqrt(P)*4 lists, ``nprobe``) when no queries are given.

        Returns the index and the sweep (None when none ran). Uses every GPU faiss sees for
        training/adding when present (faiss-gpu builds, no sweep).
        """
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        dim = x.shape[1]
        ids = np.asarray(post_ids, dtype=np.int64)
        if len(x) > EXACT_MAX_POSTS and queries is not None and faiss.get_num_gpus() == 0:
            sweep = sweep_index(x, queries, k=100, target_recall=target_recall)
            return cls(index=sweep.index, post_ids=ids), sweep
        if len(x) <= EXACT_MAX_POSTS:
            index: faiss.Index = faiss.IndexFlatIP(dim)
        else:
            nlist = int(4 * np.sqrt(len(x)))
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.nprobe = nprobe
        if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
            gpu = faiss.index_cpu_to_all_gpus(index)
            gpu.train(x)
            gpu.add(x)
            index = faiss.index_gpu_to_cpu(gpu)
        else:
            index.train(x)
            index.add(x)
        return cls(index=index, post_ids=ids), None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [B, E] queries -> (scores [B, k], post ids [B, k]); id -1 where fewer exist."""
        k = min(k, len(self))
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        ids = np.where(rows >= 0, self.post_ids[np.maximum(rows, 0)], -1)
        return scores, ids

    def save(self, index_path: Path, ids_path: Path) -> None:
        faiss.write_index(self.index, str(index_path))
        np.save(ids_path, self.post_ids)

    @classmethod
    def load(cls, index_path: Path, ids_path: Path) -> PostIndex:
        return cls(faiss.read_index(str(index_path)), np.load(ids_path, allow_pickle=False))
