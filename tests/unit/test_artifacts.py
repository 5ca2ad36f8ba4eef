import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from feedrec.artifacts import ArtifactError, load_artifact, save_artifact
from feedrec.artifacts.model_registry import ModelRegistry
from feedrec.features.vocabulary import Vocabularies, Vocabulary
from feedrec.models.ranker import Ranker, RankerConfig
from feedrec.runtime.ray_cluster import repo_root
from feedrec.schema import TABLES


def _save(root: Path) -> Ranker:
    vocabs = Vocabularies({t.vocab: Vocabulary(np.arange(4)) for t in TABLES})
    model = Ranker(RankerConfig(num_rows=vocabs.num_rows()))
    save_artifact(
        root,
        kind="ranker",
        state_dict=model.state_dict(),
        model_config=model.config,
        vocabs=vocabs,
        metadata={"note": "test"},
    )
    return model


def test_round_trip_gives_identical_weights(tmp_path: Path) -> None:
    model = _save(tmp_path / "a")
    art = load_artifact(tmp_path / "a")
    loaded = art.build_model()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert art.metadata == {"note": "test"} and art.version.startswith("ranker-")
    assert "torch" in (tmp_path / "a" / "manifest.json").read_text()


def test_tampered_or_truncated_files_are_refused(tmp_path: Path) -> None:
    _save(tmp_path / "a")
    weights = tmp_path / "a" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match=r"weights\.pt"):
        load_artifact(tmp_path / "a")


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="manifest"):
        load_artifact(tmp_path)


def test_a_vocabularies_only_load_is_verified_the_same_way(tmp_path: Path) -> None:
    _save(tmp_path / "a")
    full, light = load_artifact(tmp_path / "a"), load_artifact(tmp_path / "a", weights=False)
    assert light.version == full.version and light.state_dict == {}
    for name, vocab in full.vocabs.by_name.items():
        np.testing.assert_array_equal(light.vocabs[name].ids, vocab.ids)
    with pytest.raises(ArtifactError, match="without its weights"):
        light.build_model()
    weights = tmp_path / "a" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-10])  # not read, but still checksummed
    with pytest.raises(ArtifactError, match=r"weights\.pt"):
        load_artifact(tmp_path / "a", weights=False)


def _heavy_imports(code: str) -> str:
    """Run ``code`` in a fresh interpreter -> which of torch, TorchRec and faiss it imported."""
    probe = (
        f"import sys; from pathlib import Path; {code}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchrec', 'faiss'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo_root()
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_ingress_replica_needs_no_torch(tmp_path: Path) -> None:
    """What an Ingress replica does at start (import the Serve app's module, read the ranker's
    vocabularies, build its feature transform) imports neither torch, TorchRec nor faiss: they
    are the Retrieval replicas' alone (an Ingress replica: 668 MiB RSS with them, 350 without)."""
    _save(tmp_path / "a")
    code = (
        "import apps.feed_service.app; "
        "from feedrec.artifacts import load_artifact; "
        "from feedrec.features.transform import FeatureTransform; "
        f"art = load_artifact(Path({str(tmp_path / 'a')!r}), weights=False); "
        "FeatureTransform(art.vocabs)"
    )
    assert _heavy_imports(code) == "[]"


def test_the_admin_calls_of_an_ingress_replica_need_no_torch(tmp_path: Path) -> None:
    """Promote, shadow and rollback run in the (torch-free) Ingress replicas: they verify
    checksums without deserialising weights. Importing torch there took the first promote past a
    5 s client timeout on a loaded CI host."""
    _save(tmp_path / "a")
    registry = ModelRegistry(tmp_path / "registry")
    for _ in range(3):
        registry.register("ranker", tmp_path / "a", metrics={"auc.like": 0.7})
    code = (
        "from feedrec.artifacts.model_registry import ModelRegistry; "
        f"r = ModelRegistry(Path({str(tmp_path / 'registry')!r})); "
        "r.promote('ranker', 1); r.promote('ranker', 2); r.set_shadow('ranker', 3); "
        "assert r.rollback('ranker').version == 1"
    )
    assert _heavy_imports(code) == "[]"
    assert registry.production_version("ranker") == 1 and registry.shadow_version("ranker") == 3
