"""Versioned model artifact directories with a checksummed manifest.

Layout of an artifact directory::

    manifest.json        kind, model config, metadata, library versions, sha256 of every file
    weights.pt           the unsharded state dict (tensors only; loaded with weights_only=True)
    vocabularies.npz     the vocabularies the model's embedding rows were fitted with
    <extra files>        e.g. index.faiss + index_post_ids.npy for a retrieval index, ranker.onnx
                         (the ranker exported for onnxruntime, checked against eager)

Importing this module imports neither torch nor TorchRec: torch is imported when weights are
saved or loaded, the model classes when a model is built. So a process that only verifies an
artifact and reads its exported ranker (a Triton python-backend instance) or its vocabularies
(an Ingress replica, ``load_artifact(weights=False)``) starts faster and holds no torch.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedrec.features.vocabulary import Vocabularies
from feedrec.models.model_config import RankerConfig, TwoTowerConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
VOCABULARIES = "vocabularies.npz"
#: The ranker exported to ONNX at training time (ranker artifacts written since session 7).
RANKER_ONNX = "ranker.onnx"
_LIBRARIES = ("torch", "torchrec", "fbgemm-gpu-cpu", "ray", "numpy", "pyarrow", "faiss-cpu")


class ArtifactError(RuntimeError):
    """A missing, truncated or tampered artifact."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _model_config(kind: str, config: dict[str, Any]) -> RankerConfig | TwoTowerConfig:
    tuples: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    if kind == "ranker":
        return RankerConfig(**tuples)
    if kind == "two_tower":
        return TwoTowerConfig(**tuples)
    raise ArtifactError(f"unknown model kind {kind!r}")


@dataclass(frozen=True)
class ModelArtifact:
    """A loaded, verified artifact."""

    root: Path
    kind: str
    model_config: RankerConfig | TwoTowerConfig
    vocabs: Vocabularies
    metadata: dict[str, Any]
    version: str  # kind + the first 12 hex digits of the weights' sha256
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    versions: dict[str, str] = field(default_factory=dict)  # libraries it was trained with

    def build_model(self) -> nn.Module:
        """The served module with its weights, in eval mode."""
        if not self.state_dict:
            raise ArtifactError(f"{self.root}: loaded without its weights (weights=False)")
        from feedrec.models.ranker import Ranker
        from feedrec.models.two_tower import TwoTower

        model: nn.Module
        if isinstance(self.model_config, RankerConfig):
            model = Ranker(self.model_config)
        else:
            model = TwoTower(self.model_config)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def path(self, name: str) -> Path:
        """Path of an extra file listed in the manifest."""
        return self.root / name


def save_artifact(
    root: Path,
    *,
    kind: str,
    state_dict: dict[str, torch.Tensor],
    model_config: RankerConfig | TwoTowerConfig,
    vocabs: Vocabularies,
    metadata: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write an artifact directory (replacing ``root``); the manifest is written last."""
    import torch

    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp / WEIGHTS)
    vocabs.save(tmp / VOCABULARIES)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    files = sorted(p.name for p in tmp.iterdir())
    manifest = {
        "kind": kind,
        "model_config": asdict(model_config),
        "metadata": metadata,
        "versions": library_versions(),
        "created_unix": int(time.time()),
        "sha256": {name: _sha256(tmp / name) for name in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def verify_artifact(root: Path) -> dict[str, Any]:
    """Check the manifest and the sha256 of every file it lists -> the manifest.

    Raises :class:`ArtifactError` naming the bad file. :func:`load_artifact` calls this first;
    alone, it is for a process that reads one listed file itself (e.g. ``ranker.onnx``)."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: no {MANIFEST} (not an artifact, or an interrupted write)")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path}: unreadable manifest ({e})") from e
    for name, expected in manifest["sha256"].items():
        # A manifest may only name files inside its own directory (no "../", no absolute
        # paths, no symlinks out): an artifact copied from elsewhere is untrusted input.
        path = root / name
        if Path(name).name != name or name in ("", ".", "..") or path.is_symlink():
            raise ArtifactError(f"{root}: manifest names {name!r}, not a plain file in it")
        if not path.is_file():
            raise ArtifactError(f"{root}: file {name} listed in the manifest is missing")
        if _sha256(path) != expected:
            raise ArtifactError(f"{root}: checksum mismatch for {name} (truncated or tampered)")
    return manifest


def load_artifact(root: Path, *, weights: bool = True) -> ModelArtifact:
    """Verify every checksum (:func:`verify_artifact`), then load. Raises
    :class:`ArtifactError` naming the bad file.

    ``weights=False``: verified the same way, but the weights are not deserialised (for a
    process that needs only the vocabularies, e.g. an Ingress replica whose ranker is in
    Triton); :meth:`ModelArtifact.build_model` then refuses."""
    root = Path(root)
    manifest = verify_artifact(root)
    state_dict: dict[str, torch.Tensor] = {}
    if weights:
        import torch

        state_dict = torch.load(root / WEIGHTS, map_location="cpu", weights_only=True)
    return ModelArtifact(
        root=root,
        kind=manifest["kind"],
        model_config=_model_config(manifest["kind"], manifest["model_config"]),
        vocabs=Vocabularies.load(root / VOCABULARIES),
        metadata=manifest["metadata"],
        version=f"{manifest['kind']}-{manifest['sha256'][WEIGHTS][:12]}",
        state_dict=state_dict,
        versions=manifest.get("versions", {}),
    )
