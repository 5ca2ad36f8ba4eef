"""write_model_repository output, and the ranker template's execute() error paths (no server)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from feedrec.serving.triton_repository import (
    add_model_version,
    ranker_model_template,
    remove_model_version,
    write_model_repository,
)

DIMS: dict[str, Any] = {"num_single": 5, "num_multi": 20, "num_dense": 7, "num_outputs": 3}


def _parse(model_dir: Path) -> Any:
    return text_format.Parse(
        (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )


def test_writes_parseable_config_and_copies_template(tmp_path: Path) -> None:
    artifact = tmp_path / "artifact dir"  # a space: quoting must hold
    artifact.mkdir()
    model_dir = write_model_repository(
        tmp_path / "repo", artifact, max_batch_size=1024, instance_count=2, **DIMS
    )
    assert model_dir == tmp_path / "repo" / "ranker"
    cfg = _parse(model_dir)
    assert cfg.name == "ranker"
    assert cfg.backend == "python"
    assert cfg.max_batch_size == 1024
    inputs = {
        i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input
    }
    assert inputs == {
        "single_ids": ("TYPE_INT64", [5]),
        "multi_ids": ("TYPE_INT64", [20]),
        "dense": ("TYPE_FP32", [7]),
    }
    [out] = cfg.output
    assert (out.name, model_config_pb2.DataType.Name(out.data_type), list(out.dims)) == (
        "scores",
        "TYPE_FP32",
        [3],
    )
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    [group] = cfg.instance_group
    assert group.count == 2
    assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.version_policy.HasField("all")
    assert cfg.parameters["artifact_dir"].string_value == str(artifact.resolve())
    copied = model_dir / "1" / "model.py"
    assert copied.read_bytes() == ranker_model_template().read_bytes()


def test_new_version_and_extra_parameters(tmp_path: Path) -> None:
    artifact = tmp_path / "a"
    artifact.mkdir()
    write_model_repository(tmp_path / "repo", artifact, **DIMS)
    model_dir = write_model_repository(
        tmp_path / "repo",
        artifact,
        model_name="ranker_v2",
        version=3,
        max_queue_delay_us=0,
        extra_parameters={"predictor_factory": 'm:F "quoted"'},
        **DIMS,
    )
    cfg = _parse(model_dir)
    assert cfg.name == "ranker_v2"
    assert cfg.version_policy.HasField("all")
    assert (model_dir / "3" / "model.py").is_file()
    assert cfg.parameters["predictor_factory"].string_value == 'm:F "quoted"'
    assert (tmp_path / "repo" / "ranker" / "config.pbtxt").is_file()  # untouched


def test_add_model_version_keeps_named_versions_and_the_config(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    model_dir = write_model_repository(tmp_path / "repo", a, version=1, **DIMS)
    (model_dir / "7").mkdir()  # stale, e.g. from an earlier run
    config = (model_dir / "config.pbtxt").read_bytes()
    add_model_version(tmp_path / "repo", b, 2, keep=[1])
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["1", "2"]
    assert (model_dir / "2" / "artifact_dir.txt").read_text() == str(b.resolve())
    assert (model_dir / "config.pbtxt").read_bytes() == config  # a reload of every version
    add_model_version(tmp_path / "repo", a, 3, keep=[2])
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["2", "3"]
    with pytest.raises(FileNotFoundError, match=r"config\.pbtxt"):
        add_model_version(tmp_path / "other", a, 1)
    with pytest.raises(ValueError, match="keep_0"):
        add_model_version(tmp_path / "repo", a, 4, keep=[0])
    # A cleared shadow version leaves; the others and the config stay.
    assert remove_model_version(tmp_path / "repo", 3) is True
    assert remove_model_version(tmp_path / "repo", 3) is False
    assert sorted(p.name for p in model_dir.iterdir() if p.is_dir()) == ["2"]
    assert (model_dir / "config.pbtxt").read_bytes() == config
    with pytest.raises(ValueError, match="model_name"):
        remove_model_version(tmp_path / "repo", 2, model_name="../escape")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_dense": 0}, "num_dense"),
        ({"num_multi": -1}, "num_multi"),
        ({"version": 0}, "version"),
        ({"max_queue_delay_us": -5}, "max_queue_delay_us"),
        ({"model_name": "../escape"}, "model_name"),
        ({"extra_parameters": {"artifact_dir": "/x"}}, "artifact_dir"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {**DIMS, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_model_repository(tmp_path / "repo", tmp_path, **args)


def test_rejects_missing_artifact_dir(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="artifact_dir"):
        write_model_repository(tmp_path / "repo", tmp_path / "nope", **DIMS)


# ---------------------------------------------------------------- template, with a fake pb_utils
class _FakeTensor:
    def __init__(self, name: str, t: torch.Tensor) -> None:
        self.name, self.t = name, t

    def to_dlpack(self) -> Any:
        return torch.utils.dlpack.to_dlpack(self.t)

    @classmethod
    def from_dlpack(cls, name: str, capsule: Any) -> _FakeTensor:
        return cls(name, torch.from_dlpack(capsule))


class _FakeResponse:
    def __init__(self, output_tensors: list[_FakeTensor] | None = None, error: Any = None) -> None:
        self.output_tensors, self.error = output_tensors, error


def _fake_pb_utils() -> types.ModuleType:
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = _FakeTensor  # type: ignore[attr-defined]
    mod.InferenceResponse = _FakeResponse  # type: ignore[attr-defined]
    mod.TritonError = str  # type: ignore[attr-defined]
    mod.get_input_tensor_by_name = lambda req, name: req.get(name)  # type: ignore[attr-defined]
    return mod


class _Predictor:
    def __call__(self, sparse: torch.Tensor, topics: torch.Tensor, dense: torch.Tensor) -> Any:
        return torch.stack([sparse.sum(1).float(), dense.sum(1)], dim=1)


@pytest.fixture
def template(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("ranker_template", ranker_model_template())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake = types.ModuleType("fake_predictor_mod")
    fake.make = lambda artifact_dir: _Predictor()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_predictor_mod", fake)
    model = module.TritonPythonModel()
    config = {
        "output": [{"name": "scores", "dims": [2]}],
        "parameters": {
            "artifact_dir": {"string_value": "/unused"},
            "predictor_factory": {"string_value": "fake_predictor_mod:make"},
        },
    }
    model.initialize({"model_config": json.dumps(config)})
    return model


def _request(n: int, d: int = 3) -> dict[str, _FakeTensor]:
    return {
        "single_ids": _FakeTensor("single_ids", torch.arange(n * 2).reshape(n, 2)),
        "multi_ids": _FakeTensor("multi_ids", torch.full((n, 4), -1)),
        "dense": _FakeTensor("dense", torch.ones(n, d)),
    }


def test_template_splits_and_isolates_bad_requests(template: Any) -> None:
    bad_missing = _request(2)
    del bad_missing["dense"]
    bad_rows = _request(2)
    bad_rows["dense"] = _FakeTensor("dense", torch.ones(3, 3))
    responses = template.execute([_request(1), bad_missing, _request(3), bad_rows])
    assert [r.error is None for r in responses] == [True, False, True, False]
    assert "dense" in responses[1].error and "batch dim" in responses[3].error
    first = responses[0].output_tensors[0].t.numpy()
    np.testing.assert_array_equal(first, [[1.0, 3.0]])
    third = responses[2].output_tensors[0].t.numpy()
    np.testing.assert_array_equal(third, [[1.0, 3.0], [5.0, 3.0], [9.0, 3.0]])


def test_template_predictor_failure_becomes_error_responses(template: Any) -> None:
    def boom(*args: Any) -> Any:
        raise RuntimeError("nan in embeddings")

    template.predictor = boom
    responses = template.execute([_request(1), _request(2)])
    assert all("nan in embeddings" in r.error for r in responses)
