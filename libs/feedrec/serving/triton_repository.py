"""Write a Triton model repository for the ranker (python backend + TorchRec inside the stub).

Layout written by :func:`write_model_repository`::

    repo_dir/<model_name>/config.pbtxt
    repo_dir/<model_name>/<version>/model.py     # copy of apps/triton/ranker/model.py

The wheel-bundled Triton only has the python backend (no libtorch/onnxruntime backends), so the
model runs as a ``TritonPythonModel`` that loads ``RankerPredictor`` from ``artifact_dir``.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

INPUT_SINGLE = "single_ids"
INPUT_MULTI = "multi_ids"
INPUT_DENSE = "dense"
OUTPUT_SCORES = "scores"

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def ranker_model_template() -> Path:
    """Path of the python-backend model file (``apps/triton/ranker/model.py``)."""
    # libs/feedrec/serving/triton_repository.py -> parents[3] is the repository root.
    return Path(__file__).resolve().parents[3] / "apps" / "triton" / "ranker" / "model.py"


def _pbtxt_string(value: str) -> str:
    """Quote ``value`` as a protobuf text-format string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def render_config(
    *,
    model_name: str,
    version: int,
    artifact_dir: Path,
    num_single: int,
    num_multi: int,
    num_dense: int,
    num_outputs: int,
    max_batch_size: int,
    instance_count: int,
    max_queue_delay_us: int,
    extra_parameters: Mapping[str, str] | None = None,
) -> str:
    """The ``config.pbtxt`` text. Dims exclude the batch dim (Triton adds it: max_batch_size > 0).

    Inputs per row: ``single_ids`` int64 [num_single], ``multi_ids`` int64 [num_multi]
    (-1 = padding), ``dense`` fp32 [num_dense]. Output: ``scores`` fp32 [num_outputs].
    """
    params = {"artifact_dir": str(artifact_dir), **(extra_parameters or {})}
    params_text = "".join(
        f"parameters {{\n  key: {_pbtxt_string(k)}\n"
        f"  value: {{ string_value: {_pbtxt_string(v)} }}\n}}\n"
        for k, v in params.items()
    )
    return f"""\
name: {_pbtxt_string(model_name)}
backend: "python"
max_batch_size: {max_batch_size}
# Serve exactly the version just written, never a stale higher-numbered one left in the dir.
version_policy: {{ specific: {{ versions: [ {version} ] }} }}
input [
  {{ name: "{INPUT_SINGLE}" data_type: TYPE_INT64 dims: [ {num_single} ] }},
  {{ name: "{INPUT_MULTI}" data_type: TYPE_INT64 dims: [ {num_multi} ] }},
  {{ name: "{INPUT_DENSE}" data_type: TYPE_FP32 dims: [ {num_dense} ] }}
]
output [
  {{ name: "{OUTPUT_SCORES}" data_type: TYPE_FP32 dims: [ {num_outputs} ] }}
]
# Concurrent requests (one per feed request, ~hundreds of candidates each) are merged into one
# model call; execute() concatenates them so the MLP sees a single large batch.
dynamic_batching {{
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{ count: {instance_count} kind: KIND_CPU }}
]
{params_text}"""


def write_model_repository(
    repo_dir: Path,
    artifact_dir: Path,
    *,
    model_name: str = "ranker",
    version: int = 1,
    num_single: int,
    num_multi: int,
    num_dense: int,
    num_outputs: int,
    max_batch_size: int = 8192,
    instance_count: int = 1,
    max_queue_delay_us: int = 500,
    extra_parameters: Mapping[str, str] | None = None,
) -> Path:
    """Write ``repo_dir/<model_name>/{config.pbtxt, <version>/model.py}``; return the model dir.

    ``artifact_dir`` (a ``RankerPredictor`` artifact) is stored as an absolute path in the config
    because the python backend stub runs with Triton's working directory, not the caller's.
    Re-running overwrites config.pbtxt and model.py; other version dirs are left alone but not
    served (the version_policy names ``version`` only). ``extra_parameters`` become more
    ``parameters`` entries (string values), e.g. ``predictor_factory`` read by the template.
    """
    if not _MODEL_NAME_RE.match(model_name):
        raise ValueError(f"model_name {model_name!r} must match {_MODEL_NAME_RE.pattern}")
    positive = {
        "version": version,
        "num_single": num_single,
        "num_multi": num_multi,
        "num_dense": num_dense,
        "num_outputs": num_outputs,
        "max_batch_size": max_batch_size,
        "instance_count": instance_count,
    }
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(max_queue_delay_us, bool) or not isinstance(max_queue_delay_us, int):
        raise ValueError(f"max_queue_delay_us must be an int, got {max_queue_delay_us!r}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us}")
    extra = dict(extra_parameters or {})
    if "artifact_dir" in extra:
        raise ValueError("extra_parameters must not set artifact_dir (pass artifact_dir)")
    artifact_dir = Path(artifact_dir).resolve()
    if not artifact_dir.is_dir():
        raise ValueError(f"artifact_dir {artifact_dir} is not a directory")
    template = ranker_model_template()
    if not template.is_file():
        raise FileNotFoundError(f"ranker model template missing: {template}")

    model_dir = Path(repo_dir) / model_name
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    config = render_config(
        model_name=model_name,
        version=version,
        artifact_dir=artifact_dir,
        num_single=num_single,
        num_multi=num_multi,
        num_dense=num_dense,
        num_outputs=num_outputs,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        max_queue_delay_us=max_queue_delay_us,
        extra_parameters=extra,
    )
    (model_dir / "config.pbtxt").write_text(config)
    shutil.copyfile(template, version_dir / "model.py")
    return model_dir
