"""PortableRanker and its ONNX / TorchScript exports score like the eager TorchRec ranker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from feedrec.artifacts import ArtifactError
from feedrec.artifacts.artifact import RANKER_ONNX
from feedrec.features.vocabulary import Vocabularies, Vocabulary
from feedrec.models import portable_ranker
from feedrec.models.onnx_ranker_predictor import OnnxRankerPredictor
from feedrec.models.portable_ranker import PortableRanker
from feedrec.models.predictor import RankerPredictor
from feedrec.models.ranker import Ranker, RankerConfig
from feedrec.schema import TABLES
from feedrec.serving.triton_repository import write_portable_models

VOCAB = 50  # ids per vocabulary of the test rankers


def _ranker(seed: int = 0) -> Ranker:
    torch.manual_seed(seed)
    vocabs = Vocabularies({t.vocab: Vocabulary(np.arange(VOCAB)) for t in TABLES})
    model = Ranker(RankerConfig(num_rows=vocabs.num_rows()))
    # Non-trivial calibration and dwell so every output path is compared.
    model.calibration.copy_(torch.tensor([[1.5, -0.2], [0.7, 0.1], [1.0, 0.3], [2.0, -1.0]]))
    return model.eval()


def test_portable_equals_eager_including_empty_histories() -> None:
    model = _ranker()
    portable = PortableRanker(model)
    single, multi, dense = portable.random_inputs(300, seed=1)
    assert (multi == -1).all(dim=1).any(), "some rows must have no history at all"
    with torch.no_grad():
        got = portable(single, multi, dense)
    want = RankerPredictor(model)(single, multi, dense)
    assert got.shape == (300, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_exports_load_in_their_runtimes_and_match_eager(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    model = _ranker()
    artifact = ranker_artifact(tmp_path / "ranker", model=model, vocab_size=VOCAB)
    dirs = write_portable_models(tmp_path / "repo", artifact, version=3, instance_count=2)
    assert set(dirs) == {"onnxruntime", "pytorch"}
    platforms = {}
    for backend, model_dir in dirs.items():
        cfg = text_format.Parse(
            (model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
        )
        platforms[backend] = cfg.platform
        assert cfg.name == model_dir.name
        assert list(cfg.version_policy.specific.versions) == [3]
        assert cfg.instance_group[0].count == 2
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO
    assert platforms == {"onnxruntime": "onnxruntime_onnx", "pytorch": "pytorch_libtorch"}

    # A fresh batch size (the export's batch dim is dynamic) through the files just written.
    import onnxruntime

    portable = PortableRanker(model)
    inputs = portable.random_inputs(37, seed=7)
    want = RankerPredictor(model)(*inputs).numpy()
    session = onnxruntime.InferenceSession(
        str(dirs["onnxruntime"] / "3" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = ("single_ids", "multi_ids", "dense")
    got_onnx = session.run(None, {n: t.numpy() for n, t in zip(names, inputs, strict=True)})[0]
    with torch.no_grad():
        got_ts = torch.jit.load(str(dirs["pytorch"] / "3" / "model.pt"))(*inputs).numpy()
    assert np.abs(got_onnx - want).max() <= 1e-4
    assert np.abs(got_ts - want).max() <= 1e-4


def test_long_dwell_predictions_are_compared_relative_to_their_size(tmp_path: Path) -> None:
    # A ranker trained for 3 epochs on the small world predicted up to ~5e4 s of dwell on the
    # random check rows, and float32 rounding alone put its exact ONNX export 4.7e-2 s off.
    model = _ranker()
    dwell_out = model.towers[-1][-1]
    with torch.no_grad():
        dwell_out.bias.fill_(10.0)  # exp(10) - 1: ~22,000 s
    portable = PortableRanker(model)
    single, multi, dense = portable.random_inputs(256)
    eager = RankerPredictor(model)(single, multi, dense).numpy()
    assert eager[:, 4].min() > 1e3
    error = portable.write_checked_onnx(tmp_path / "ranker.onnx")
    assert 0 < error <= portable_ranker.EXPORT_TOLERANCE
    # Seconds are compared relative to their size, probabilities absolutely: an export whose
    # dwell is off by 0.1 %, or whose probabilities are off by 1e-3, is still refused.
    for column, offset in ((4, eager[:, 4] * 1e-3), (0, np.full(len(eager), 1e-3))):
        drifted = eager.copy()
        drifted[:, column] += offset
        assert portable.max_error(lambda *_, d=drifted: d) == pytest.approx(1e-3, rel=1e-3)


def test_an_export_that_drifts_from_eager_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranker_artifact: Callable[..., Path]
) -> None:
    artifact = ranker_artifact(tmp_path / "ranker", model=_ranker(), vocab_size=VOCAB)
    monkeypatch.setattr(portable_ranker, "EXPORT_TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(ValueError, match=r"onnxruntime export .* differs from eager"):
        write_portable_models(tmp_path / "repo", artifact)
    assert not (tmp_path / "repo" / "ranker_onnx" / "1" / "model.onnx").exists()
    assert not (tmp_path / "repo" / "ranker_onnx" / "config.pbtxt").exists()


def test_the_predictor_serves_the_artifacts_checked_onnx_without_importing_torchrec(
    tmp_path: Path, ranker_artifact: Callable[..., Path]
) -> None:
    model = _ranker(seed=3)
    onnx = tmp_path / "ranker.onnx"
    error = PortableRanker(model).write_checked_onnx(onnx)
    assert 0 <= error <= 1e-4
    with_onnx = ranker_artifact(
        tmp_path / "new", model=model, vocab_size=VOCAB, extra={RANKER_ONNX: onnx}
    )
    without = ranker_artifact(tmp_path / "old", model=model, vocab_size=VOCAB)
    inputs = PortableRanker(model).random_inputs(200, seed=5)
    want = RankerPredictor(model)(*inputs).numpy()
    for artifact in (with_onnx, without):  # the stored export; an older artifact's in memory
        got = OnnxRankerPredictor.from_artifact(artifact)(*inputs).numpy()
        assert np.abs(got - want).max() <= 1e-4
    # A Triton instance loading the stored export needs neither TorchRec nor the model code.
    probe = (
        "import sys; from pathlib import Path; "
        "from feedrec.models.onnx_ranker_predictor import OnnxRankerPredictor as P; "
        f"P.from_artifact(Path({str(with_onnx)!r})); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchrec', 'fbgemm_gpu') "
        "or m.startswith('feedrec.models.ranker')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # The stored export is covered by the manifest: a changed byte is refused.
    stored = with_onnx / RANKER_ONNX
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match=r"ranker\.onnx"):
        OnnxRankerPredictor.from_artifact(with_onnx)
