"""The ranker with its TorchRec lookups rewritten as plain torch ops, for TorchScript and ONNX.

TorchRec's ``EmbeddingBagCollection`` runs fbgemm kernels that neither ``torch.jit.trace`` nor
the ONNX exporter can see through, so Triton's ``pytorch_libtorch`` and ``onnxruntime_onnx``
backends (what a GPU cluster runs instead of the python backend) cannot load the eager model.
:class:`PortableRanker` keeps the trained weights and the ranker's own dense head
(:meth:`Ranker.head`) and replaces only the lookup: a gather per feature, masked sum or mean over
the -1 padded multi-valued features. Its inputs and outputs are those of the Triton model
(``single_ids``, ``multi_ids``, ``dense`` -> ``scores``), so the same client talks to all three.

Example::

    portable = PortableRanker(trained_model(artifact, Ranker))
    portable.to_onnx(repo / "ranker_onnx" / "1" / "model.onnx")
    portable.to_torchscript(repo / "ranker_torchscript" / "1" / "model.pt")
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from feedrec.models.ranker import Ranker
from feedrec.schema.registry import dense_dim, sparse_features, tables_for

INPUT_NAMES = ("single_ids", "multi_ids", "dense")
OUTPUT_NAME = "scores"
#: Scores (single_ids, multi_ids, dense) tensors -> [N, 5] array-like.
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]
#: Largest export error accepted on any score: |export - eager| / max(1, |eager|), i.e. absolute
#: on the probabilities and relative on dwell seconds. An absolute bound on dwell refused exact
#: exports: random dense inputs give dwell up to ~5e4 s, where float32 rounding alone is ~5e-2.
EXPORT_TOLERANCE = 1e-4


class PortableRanker(nn.Module):
    """``forward(single_ids [N, S] int64, multi_ids [N, H] int64 (-1 pad), dense [N, D] fp32)``
    -> ``[N, 5]`` fp32 predictions (p(like), p(comment), p(share), p(hide), dwell seconds),
    equal to ``RankerPredictor`` on the same inputs up to float rounding.
    """

    def __init__(self, ranker: Ranker) -> None:
        super().__init__()
        self.ranker = ranker.eval()
        bags = ranker.ebc.embedding_bags  # ModuleDict: "ranker_<table>" -> nn.EmbeddingBag
        self.tables = nn.ParameterDict(
            {table.name: bags[f"ranker_{table.name}"].weight for table in tables_for("ranker")}
        )
        # Static layout, unrolled by tracing: (table, column offset, width, mean pooling).
        self.layout: list[tuple[str, int, int, bool]] = []
        s = m = 0
        for f in sparse_features("ranker"):
            if f.max_len == 1:
                self.layout.append((f.table, s, 1, False))
                s += 1
            else:
                self.layout.append((f.table, m, f.max_len, f.pooling == "mean"))
                m += f.max_len
        self.num_single, self.num_multi = s, m

    def forward(
        self, single_ids: torch.Tensor, multi_ids: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        slots = []
        for table, offset, width, mean in self.layout:
            weight = self.tables[table]
            if width == 1:
                slots.append(nn.functional.embedding(single_ids[:, offset], weight))
                continue
            block = multi_ids[:, offset : offset + width]  # [N, L], -1 = padding
            mask = (block >= 0).unsqueeze(2).to(weight.dtype)  # [N, L, 1]
            rows = nn.functional.embedding(block.clamp(min=0), weight) * mask  # [N, L, E]
            pooled = rows.sum(dim=1)
            if mean:  # an empty bag pools to zeros, as in fbgemm
                pooled = pooled / mask.sum(dim=1).clamp(min=1.0)
            slots.append(pooled)
        return Ranker.predictions(self.ranker.head(dense, torch.cat(slots, dim=1)))

    def random_inputs(
        self, n: int, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` random valid rows: ids within each table, ~40% history padding (and a few
        rows with none), standard normal dense features; for export checks."""
        g = torch.Generator().manual_seed(seed)
        single = torch.zeros(n, self.num_single, dtype=torch.int64)
        multi = torch.full((n, self.num_multi), -1, dtype=torch.int64)
        for table, offset, width, _ in self.layout:
            rows = int(self.tables[table].shape[0])
            ids = torch.randint(0, rows, (n, width), generator=g)
            if width == 1:
                single[:, offset] = ids[:, 0]
            else:
                ids[torch.rand(n, width, generator=g) < 0.4] = -1
                ids[: max(1, n // 50)] = -1
                multi[:, offset : offset + width] = ids
        dense = torch.randn(n, dense_dim("ranker"), generator=g)
        return single, multi, dense

    def max_error(self, score: Scorer, rows: int = 256) -> float:
        """Largest |score - eager TorchRec| / max(1, |eager|) over ``rows`` random valid rows
        (absolute on probabilities, relative on dwell seconds): how an export is checked before
        it is served (``score`` takes the three input tensors)."""
        from feedrec.models.predictor import RankerPredictor

        inputs = self.random_inputs(rows)
        eager = RankerPredictor(self.ranker)(*inputs).numpy().astype(np.float64)
        got = np.asarray(score(*inputs), dtype=np.float64)
        return float((np.abs(got - eager) / np.maximum(1.0, np.abs(eager))).max())

    def check_export(self, score: Scorer, what: str, rows: int = 256) -> float:
        """:meth:`max_error` of ``score``; ``ValueError`` naming ``what`` beyond
        :data:`EXPORT_TOLERANCE`."""
        error = self.max_error(score, rows)
        if not error <= EXPORT_TOLERANCE:
            raise ValueError(f"{what} differs from eager by {error:.2e} > {EXPORT_TOLERANCE:.0e}")
        return error

    def write_checked_onnx(self, path: Path, rows: int = 512) -> float:
        """Export to ONNX at ``path``, score ``rows`` random rows with onnxruntime and compare
        with eager (:meth:`check_export`; a failing file is removed) -> the largest error."""
        return self._write_checked(path, self.to_onnx, _onnx_scorer, "onnxruntime", rows)

    def write_checked_torchscript(self, path: Path, rows: int = 512) -> float:
        """:meth:`write_checked_onnx` for TorchScript, loaded back with ``torch.jit.load``."""
        return self._write_checked(path, self.to_torchscript, _torchscript_scorer, "pytorch", rows)

    def _write_checked(
        self,
        path: Path,
        write: Callable[[Path], Path],
        load: Callable[[Path], Scorer],
        runtime: str,
        rows: int,
    ) -> float:
        write(path)
        try:
            return self.check_export(load(path), f"{runtime} export {path}", rows)
        except ValueError:
            path.unlink()
            raise

    def to_torchscript(self, path: Path) -> Path:
        """Trace to TorchScript (Triton ``pytorch_libtorch``); the batch dim stays dynamic."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(self, self.random_inputs(4), check_trace=False)
        traced.save(str(path))
        return path

    def to_onnx(self, path: Path, opset: int = 17) -> Path:
        """Export to ONNX (Triton ``onnxruntime_onnx``) with a dynamic batch dim."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes(opset))
        return path

    def onnx_bytes(self, opset: int = 17) -> bytes:
        """The ONNX model (dynamic batch dim) as bytes."""
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), warnings.catch_warnings():
            # The TorchScript-based exporter is deprecated in favour of dynamo, which needs
            # onnxscript; this graph is plain gathers and matmuls, which it exports exactly.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                self,
                self.random_inputs(4),
                f"{tmp}/model.onnx",
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_axes={name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)},
                opset_version=opset,
                dynamo=False,
            )
            return Path(f"{tmp}/model.onnx").read_bytes()


def _onnx_scorer(path: Path) -> Scorer:
    """The ONNX file at ``path`` on onnxruntime (CPU): (single, multi, dense) -> [N, 5]."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(*t: torch.Tensor) -> object:
        return session.run(None, {n: x.numpy() for n, x in zip(INPUT_NAMES, t, strict=True)})[0]

    return run


def _torchscript_scorer(path: Path) -> Scorer:
    """The TorchScript file at ``path``: (single, multi, dense) -> [N, 5]."""
    traced = torch.jit.load(str(path))

    def call(*t: torch.Tensor) -> object:
        with torch.no_grad():
            return traced(*t).numpy()

    return call
