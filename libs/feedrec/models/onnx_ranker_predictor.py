"""``RankerPredictor``'s interface on onnxruntime: what the Triton python backend runs when the
stack's ``ranker_runtime`` is ``onnxruntime`` (half the CPU time of eager TorchRec for 500 rows
on one thread: 21 vs 42 ms measured).

Ranker artifacts carry ``ranker.onnx``, exported and checked against eager by the training job
that wrote them (:meth:`PortableRanker.write_checked_onnx`). Loading a version then verifies
the artifact's checksums and reads that file, importing neither TorchRec nor the model code:
a Triton instance starts in a third of the time, which is what a promotion or a restarted
server waits for. Artifacts written before ranker.onnx existed get the ranker exported in
memory at load and checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from feedrec.artifacts.artifact import RANKER_ONNX, verify_artifact

if TYPE_CHECKING:
    from feedrec.models.ranker import Ranker


class OnnxRankerPredictor:
    """An onnxruntime session over the exported ranker, called like ``RankerPredictor``."""

    def __init__(self, onnx_model: bytes | Path) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # One thread per Triton instance: instances, not threads, scale this model.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        model = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
        self.session = onnxruntime.InferenceSession(
            model, options, providers=["CPUExecutionProvider"]
        )

    @classmethod
    def from_ranker(cls, ranker: Ranker) -> OnnxRankerPredictor:
        """Export ``ranker`` in memory; ``ValueError`` if onnxruntime's scores differ from
        eager beyond the export tolerance."""
        from feedrec.models.portable_ranker import PortableRanker

        portable = PortableRanker(ranker)
        predictor = cls(portable.onnx_bytes())
        portable.check_export(lambda *t: predictor(*t).numpy(), "onnxruntime ranker")
        return predictor

    @classmethod
    def from_artifact(cls, artifact_dir: Path) -> OnnxRankerPredictor:
        """The artifact's ``ranker.onnx`` once every checksum holds; older artifacts without
        it: :meth:`from_ranker` on their weights."""
        artifact_dir = Path(artifact_dir)
        if RANKER_ONNX in verify_artifact(artifact_dir)["sha256"]:
            return cls(artifact_dir / RANKER_ONNX)
        from feedrec.models.predictor import trained_model
        from feedrec.models.ranker import Ranker

        return cls.from_ranker(trained_model(artifact_dir, Ranker))

    def __call__(
        self, single_ids: torch.Tensor, multi_ids: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """int64 [N, S], int64 [N, M] (-1 padded), float32 [N, D] -> float32 [N, 5]."""
        feeds = {
            "single_ids": single_ids.numpy(),
            "multi_ids": multi_ids.numpy(),
            "dense": dense.numpy(),
        }
        return torch.from_numpy(self.session.run(None, feeds)[0])
