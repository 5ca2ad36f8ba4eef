"""Write a Triton model repository for the ranker (python backend + TorchRec inside the stub).

Layout written by :func:`write_model_repository`::

    repo_dir/<model_name>/config.pbtxt
    repo_dir/<model_name>/<version>/model.py     # copy of apps/triton/ranker/model.py
    repo_dir/<model_name>/<version>/artifact_dir.txt   # the artifact this version serves

The wheel-bundled Triton only has the python backend (no libtorch/onnxruntime backends), so the
model runs as a ``TritonPythonModel`` that loads ``RankerPredictor`` from ``artifact_dir``.
:func:`write_portable_models` adds the same ranker for the backends a GPU cluster's Triton has::

    repo_dir/<model_name>_onnx/{config.pbtxt, <version>/model.onnx}        # onnxruntime_onnx
    repo_dir/<model_name>_torchscript/{config.pbtxt, <version>/model.pt}   # pytorch_libtorch

each checked against the eager model with the matching runtime before it is kept.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, TypedDict

from feedrec.schema.registry import TASKS, dense_dim, sparse_features

INPUT_SINGLE = "single_ids"
INPUT_MULTI = "multi_ids"
INPUT_DENSE = "dense"
OUTPUT_SCORES = "scores"
#: In each version dir of the python-backend model: the artifact that version serves.
ARTIFACT_FILE = "artifact_dir.txt"

#: python: TritonPythonModel over the eager TorchRec model (what the wheel's server runs);
#: onnxruntime / pytorch: the PortableRanker export for those Triton backends.
Backend = Literal["python", "onnxruntime", "pytorch"]
_HEADER = {
    "python": 'backend: "python"',
    "onnxruntime": 'platform: "onnxruntime_onnx"',
    "pytorch": 'platform: "pytorch_libtorch"',
}
#: The python-backend ranker serves every version directory present: its writers keep exactly
#: the served versions on disk (:func:`add_model_version`), so a swap adds a directory and never
#: touches config.pbtxt, whose change would make Triton reload every version. The exported
#: models have one version, named.
_POLICY: dict[str, str] = {
    "python": "# Every version dir present is served (add_model_version keeps only those).\n"
    "version_policy: {{ all: {{}} }}",
    "onnxruntime": "version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
    "pytorch": "version_policy: {{ specific: {{ versions: [ {version} ] }} }}",
}

_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class RankerWidths(TypedDict):
    num_single: int
    num_multi: int
    num_dense: int
    num_outputs: int


def ranker_io_widths() -> RankerWidths:
    """Triton tensor widths of the ranker, from the registry."""
    feats = sparse_features("ranker")
    return {
        "num_single": sum(1 for f in feats if f.max_len == 1),
        "num_multi": sum(f.max_len for f in feats if f.max_len > 1),
        "num_dense": dense_dim("ranker"),
        "num_outputs": len(TASKS),
    }


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
    backend: Backend = "python",
) -> str:
    """The ``config.pbtxt`` text. Dims exclude the batch dim (Triton adds it: max_batch_size > 0).

    Inputs per row: ``single_ids`` int64 [num_single], ``multi_ids`` int64 [num_multi]
    (-1 = padding), ``dense`` fp32 [num_dense]. Output: ``scores`` fp32 [num_outputs].
    The python backend runs on CPU instances; the exported backends use ``KIND_AUTO`` (GPU
    instances where the node has GPUs, else CPU).
    """
    _check_sizes(
        model_name,
        version=version,
        num_single=num_single,
        num_multi=num_multi,
        num_dense=num_dense,
        num_outputs=num_outputs,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        max_queue_delay_us=max_queue_delay_us,
    )
    params = {"artifact_dir": str(artifact_dir), **(extra_parameters or {})}
    kind = "KIND_CPU" if backend == "python" else "KIND_AUTO"
    params_text = "".join(
        f"parameters {{\n  key: {_pbtxt_string(k)}\n"
        f"  value: {{ string_value: {_pbtxt_string(v)} }}\n}}\n"
        for k, v in params.items()
    )
    return f"""\
name: {_pbtxt_string(model_name)}
{_HEADER[backend]}
max_batch_size: {max_batch_size}
{_POLICY[backend].format(version=version)}
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
  {{ count: {instance_count} kind: {kind} }}
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
    removed (Triton serves every version directory present). ``extra_parameters`` become more
    ``parameters`` entries (string values), e.g. ``predictor_factory`` read by the template.
    """
    extra = dict(extra_parameters or {})
    if "artifact_dir" in extra:
        raise ValueError("extra_parameters must not set artifact_dir (pass artifact_dir)")
    _check_artifact_dir(artifact_dir)
    artifact_dir = Path(artifact_dir).resolve()
    template = ranker_model_template()
    if not template.is_file():
        raise FileNotFoundError(f"ranker model template missing: {template}")
    config = render_config(  # validates the name and sizes before anything is written
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
    model_dir = Path(repo_dir) / model_name
    _write_version(model_dir, artifact_dir, version, keep=())
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def add_model_version(
    repo_dir: Path,
    artifact_dir: Path,
    version: int,
    *,
    keep: Sequence[int] = (),
    model_name: str = "ranker",
) -> Path:
    """Add ``<model>/<version>/`` serving ``artifact_dir`` next to the versions in ``keep``
    (every other version directory is removed); config.pbtxt is left as it is, so a following
    ``load_model`` loads only the new version and unloads the removed ones, while the kept
    ones answer throughout. Returns the version dir."""
    model_dir = Path(repo_dir) / model_name
    if not (model_dir / "config.pbtxt").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.pbtxt (write_model_repository first)")
    _check_sizes(model_name, version=version, **{f"keep_{v}": v for v in keep})
    _check_artifact_dir(artifact_dir)
    return _write_version(model_dir, Path(artifact_dir).resolve(), version, keep)


def remove_model_version(repo_dir: Path, version: int, *, model_name: str = "ranker") -> bool:
    """Remove ``<model>/<version>/`` (a following ``load_model`` unloads it); False if absent."""
    _check_sizes(model_name, version=version)
    version_dir = Path(repo_dir) / model_name / str(version)
    if not version_dir.is_dir():
        return False
    shutil.rmtree(version_dir)
    return True


def _write_version(model_dir: Path, artifact_dir: Path, version: int, keep: Sequence[int]) -> Path:
    template = ranker_model_template()
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, version_dir / "model.py")
    # Per version (the config is per model): what lets version 2 serve another artifact while
    # version 1 still answers during a swap.
    (version_dir / ARTIFACT_FILE).write_text(str(artifact_dir))
    served = {str(version), *(str(v) for v in keep)}
    for stale in model_dir.iterdir():
        if stale.is_dir() and stale.name.isdigit() and stale.name not in served:
            shutil.rmtree(stale)
    return version_dir


def _check_sizes(model_name: str, **sizes: int) -> None:
    """Validate the name and the sizes (all >= 1; the queue delay >= 0)."""
    if not _MODEL_NAME_RE.match(model_name):
        raise ValueError(f"model_name {model_name!r} must match {_MODEL_NAME_RE.pattern}")
    for name, value in sizes.items():
        low = 0 if name == "max_queue_delay_us" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_artifact_dir(artifact_dir: Path) -> None:
    if not Path(artifact_dir).is_dir():
        raise ValueError(f"artifact_dir {Path(artifact_dir).resolve()} is not a directory")


def write_portable_models(
    repo_dir: Path,
    artifact_dir: Path,
    *,
    model_name: str = "ranker",
    version: int = 1,
    max_batch_size: int = 8192,
    instance_count: int = 1,
    max_queue_delay_us: int = 500,
    check_rows: int = 512,
) -> dict[Backend, Path]:
    """Export the ranker of ``artifact_dir`` for Triton's onnxruntime and libtorch backends.

    Writes ``<model_name>_onnx`` and ``<model_name>_torchscript`` (layout in the module doc), then
    loads each file with its own runtime (onnxruntime on CPU, ``torch.jit.load``) and scores
    ``check_rows`` random valid rows: an export whose scores differ from the eager TorchRec
    model by more than ``portable_ranker.EXPORT_TOLERANCE`` raises ``ValueError`` and is not kept.
    Returns backend -> model dir.
    """
    # Imported here: the Triton client side (ranker_client) must not pull in torch/onnx.
    from feedrec.models.portable_ranker import PortableRanker
    from feedrec.models.predictor import trained_model
    from feedrec.models.ranker import Ranker

    _check_artifact_dir(artifact_dir)
    portable = PortableRanker(trained_model(Path(artifact_dir), Ranker))
    widths = ranker_io_widths()
    exports: dict[Backend, tuple[Path, str]] = {
        "onnxruntime": (Path(repo_dir) / f"{model_name}_onnx", "model.onnx"),
        "pytorch": (Path(repo_dir) / f"{model_name}_torchscript", "model.pt"),
    }
    configs = {  # rendered first: bad names or sizes fail before the slow exports
        backend: render_config(
            model_name=model_dir.name,
            artifact_dir=Path(artifact_dir).resolve(),
            backend=backend,
            version=version,
            max_batch_size=max_batch_size,
            instance_count=instance_count,
            max_queue_delay_us=max_queue_delay_us,
            **widths,
        )
        for backend, (model_dir, _) in exports.items()
    }
    write_checked = {
        "onnxruntime": portable.write_checked_onnx,
        "pytorch": portable.write_checked_torchscript,
    }
    for backend, (model_dir, filename) in exports.items():
        write_checked[backend](model_dir / str(version) / filename, check_rows)
        (model_dir / "config.pbtxt").write_text(configs[backend])
    return {backend: model_dir for backend, (model_dir, _) in exports.items()}
