"""Triton python-backend model: the feedrec ranker (TorchRec embeddings + MLP heads).

Copied into ``<repo>/<model>/<version>/model.py`` by
``feedrec.serving.triton_repository.write_model_repository``; runs inside Triton's
``triton_python_backend_stub`` with the venv's site-packages and ``libs/`` importable
(``feedrec.serving.triton_server.TritonServer`` sets that up: the venv via PATH, extra dirs
via ``FEEDREC_TRITON_PYTHONPATH``).

I/O per row (the batch dim N is added by Triton, ``max_batch_size`` > 0):
    single_ids     int64 [S]   categorical ids, one per sparse feature
    multi_ids  int64 [H]   recent topic ids, -1 = padding
    dense          fp32  [D]   dense features
    scores         fp32  [K]   one score per task head

Tensors cross the stub boundary via DLPack only: with numpy 2 installed, outputs built with
``pb_utils.Tensor(name, ndarray)`` arrive empty (size 0, no error).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.utils.dlpack
import triton_python_backend_utils as pb_utils

INPUTS = ("single_ids", "multi_ids", "dense")
OUTPUT = "scores"
DEFAULT_FACTORY = "feedrec.models.predictor:RankerPredictor.from_artifact"
_DTYPES = {"single_ids": torch.int64, "multi_ids": torch.int64, "dense": torch.float32}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        # Each instance is its own process; intra-op threads would fight over the 2 cores
        # (more instances, not more threads, is how this model scales).
        torch.set_num_threads(1)
        config = json.loads(args["model_config"])
        params = config.get("parameters", {})
        # The version dir names its own artifact (versions differ during a swap); the config
        # parameter is the fallback for repositories written without it.
        version_file = (
            Path(args.get("model_repository", ""))
            / str(args.get("model_version", ""))
            / "artifact_dir.txt"
        )
        if args.get("model_repository") and version_file.is_file():
            artifact_dir = Path(version_file.read_text().strip())
        elif "artifact_dir" in params:
            artifact_dir = Path(params["artifact_dir"]["string_value"])
        else:
            raise ValueError(f"no {version_file} and no 'artifact_dir' parameter in config.pbtxt")
        self.num_outputs = int(next(o for o in config["output"] if o["name"] == OUTPUT)["dims"][0])
        # Optional override ("module:attr.path" called with artifact_dir): lets tests serve a
        # fake predictor through this exact file.
        spec = params.get("predictor_factory", {}).get("string_value") or DEFAULT_FACTORY
        _extend_sys_path()
        self.predictor = _resolve(spec)(artifact_dir)

    def execute(self, requests: list[Any]) -> list[Any]:
        """Score every request with ONE predictor call (the dynamic batcher's point).

        Requests whose inputs are unusable get an error response; the others still get scored.
        """
        responses: list[Any] = [None] * len(requests)
        batch: dict[str, list[torch.Tensor]] = {name: [] for name in INPUTS}
        rows: list[tuple[int, int]] = []  # (request index, row count) of the batched requests
        for i, request in enumerate(requests):
            try:
                tensors = {name: _input(request, name) for name in INPUTS}
                n = tensors["dense"].shape[0]
                if any(t.shape[0] != n for t in tensors.values()):
                    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
                    raise ValueError(f"inputs disagree on the batch dim: {shapes}")
            except Exception as e:
                responses[i] = _error(f"bad request: {e}")
                continue
            for name, t in tensors.items():
                batch[name].append(t)
            rows.append((i, n))

        if rows:
            try:
                # torch.cat copies out of the request's shared memory, which Triton reclaims
                # once the response is sent.
                with torch.inference_mode():
                    scores = self.predictor(*(torch.cat(batch[name]) for name in INPUTS))
                total = sum(n for _, n in rows)
                if tuple(scores.shape) != (total, self.num_outputs):
                    raise RuntimeError(
                        f"predictor returned {tuple(scores.shape)}, "
                        f"expected ({total}, {self.num_outputs})"
                    )
                scores = scores.to(torch.float32).contiguous()
                parts = torch.split(scores, [n for _, n in rows])
                for (i, _), part in zip(rows, parts, strict=True):
                    out = pb_utils.Tensor.from_dlpack(
                        OUTPUT, torch.utils.dlpack.to_dlpack(part.contiguous())
                    )
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
            except Exception as e:
                for i, _ in rows:
                    responses[i] = _error(f"ranker failed: {type(e).__name__}: {e}")
        return responses

    def finalize(self) -> None:
        self.predictor = None


def _extend_sys_path() -> None:
    # The stub's interpreter is isolated (PYTHONPATH is ignored); TritonServer passes extra
    # import dirs (the repo's libs/, test modules) in this variable instead.
    for p in reversed(os.environ.get("FEEDREC_TRITON_PYTHONPATH", "").split(os.pathsep)):
        if p and p not in sys.path:
            sys.path.insert(0, p)


def _resolve(spec: str) -> Any:
    """Import ``"pkg.module:Attr.attr"`` and return the attribute."""
    module_name, _, attr_path = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    return obj


def _input(request: Any, name: str) -> torch.Tensor:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"missing input {name!r}")
    t = torch.from_dlpack(tensor.to_dlpack())
    if t.dtype != _DTYPES[name] or t.dim() != 2:
        raise ValueError(f"{name}: expected 2-D {_DTYPES[name]}, got {t.dim()}-D {t.dtype}")
    return t


def _error(msg: str) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg))
