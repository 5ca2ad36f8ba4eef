"""A file-system model registry: numbered, verified copies of artifacts and a production pointer.

Layout under the registry root (a local directory or a shared file system every node mounts)::

    <root>/<name>/v0001/          a copy of an artifact directory (manifest with sha256 of every
                                  file) + registration.json (metrics, data snapshot, source)
    <root>/<name>/v0002/ ...
    <root>/<name>/production.json {"version": 2, "history": [1, 2], "updated_unix": ...}
    <root>/<name>/shadow.json     {"version": 3, "updated_unix": ...}  (or "version": null)

``name`` is ``ranker`` or ``retrieval`` (the two-tower artifact with its faiss index). Serving
polls ``production.json`` (see ``feedrec.serving.model_watcher``): promotion and rollback are one
atomic file replace, and a version directory is never modified after registration. The shadow
pointer names a candidate that serving scores alongside production without showing its results
(shadow traffic: ``feedrec.serving.stages.FeedPipeline``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feedrec.artifacts.artifact import MANIFEST, ArtifactError, ModelArtifact, load_artifact

MODEL_NAMES = ("ranker", "retrieval")
REGISTRATION = "registration.json"
PRODUCTION = "production.json"
SHADOW = "shadow.json"
_VERSION_DIGITS = 4


class RegistryError(RuntimeError):
    """A bad name or version, a missing model, or a refused promotion."""


def flat_metrics(name: str, metrics: dict[str, Any]) -> dict[str, float]:
    """The gate-relevant numbers of an evaluation's ``metrics.json`` for model ``name``:
    ranker -> ``auc.<task>``, ``logloss.<task>``, ``ece.<task>``; retrieval -> ``recall@<k>``."""
    if name not in MODEL_NAMES:
        raise RegistryError(f"unknown model name {name!r} (one of {', '.join(MODEL_NAMES)})")
    out: dict[str, float] = {}
    if name == "ranker":
        for task, result in metrics.get("ranking", {}).items():
            model = result.get("model") if isinstance(result, dict) else None
            for key in ("auc", "logloss", "ece"):
                if isinstance(model, dict) and key in model:
                    out[f"{key}.{task}"] = float(model[key])
    else:
        for key, value in metrics.get("retrieval", {}).get("model", {}).items():
            out[key] = float(value)
    return out


@dataclass(frozen=True)
class PromotionGate:
    """How far a candidate may fall behind production before promotion is refused.

    Higher-is-better metrics (``auc.*``, ``recall@*``) may drop by ``max_relative_drop`` of the
    production value; ``logloss.*`` may rise by the same fraction; ``ece.*`` (tiny values, where
    relative change is noise) may rise by ``max_ece_increase`` absolute. A metric production has
    and the candidate lacks is a failure: a gate must not pass for want of evidence.
    """

    max_relative_drop: float = 0.01
    max_ece_increase: float = 0.005

    def __post_init__(self) -> None:
        if not 0 <= self.max_relative_drop < 1:
            raise ValueError(
                f"promotion gate: max_relative_drop must be in [0, 1), got {self.max_relative_drop}"
            )
        if self.max_ece_increase < 0:
            raise ValueError(
                f"promotion gate: max_ece_increase must be >= 0, got {self.max_ece_increase}"
            )

    def check(self, candidate: dict[str, float], production: dict[str, float]) -> list[str]:
        """One line per metric failing the gate (empty: passes)."""
        failures = []
        for key, old in sorted(production.items()):
            if key not in candidate:
                failures.append(f"{key}: missing from the candidate (production {old:.4f})")
                continue
            new = candidate[key]
            if key.startswith("ece."):
                limit = old + self.max_ece_increase
                bad = new > limit
            elif key.startswith("logloss."):
                limit = old * (1 + self.max_relative_drop)
                bad = new > limit
            else:  # auc.*, recall@*: higher is better
                limit = old * (1 - self.max_relative_drop)
                bad = new < limit
            if bad:
                failures.append(f"{key}: {new:.4f} vs production {old:.4f} (limit {limit:.4f})")
        return failures


@dataclass(frozen=True)
class RegistryEntry:
    """One registered version. ``path`` is an artifact directory for ``load_artifact``."""

    name: str
    version: int
    path: Path
    artifact_version: str  # ModelArtifact.version: kind + weights sha256 prefix
    metrics: dict[str, float] = field(default_factory=dict)
    data_snapshot: dict[str, Any] = field(default_factory=dict)
    registered_unix: int = 0
    source: str = ""

    @property
    def label(self) -> str:
        """What feed responses report, e.g. ``ranker-v3``."""
        return f"{self.name}-v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "artifact_version": self.artifact_version,
            "metrics": self.metrics,
            "data_snapshot": self.data_snapshot,
            "registered_unix": self.registered_unix,
            "source": self.source,
        }


@dataclass(frozen=True)
class Promotion:
    """The outcome of a promotion: ``previous`` -> ``version`` and the gate lines it passed
    (or that were overridden with ``force``)."""

    name: str
    version: int
    previous: int | None
    gate_failures: list[str]
    forced: bool


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # readers see the old or the new file, never a partial one


class ModelRegistry:
    """Register, list, promote and roll back model versions under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    # ------------------------------------------------------------------ paths
    def _model_dir(self, name: str) -> Path:
        if name not in MODEL_NAMES:
            raise RegistryError(f"unknown model name {name!r} (one of {', '.join(MODEL_NAMES)})")
        return self.root / name

    def version_dir(self, name: str, version: int) -> Path:
        """``<root>/<name>/vNNNN``; refuses anything that would resolve outside the root
        (a symlinked version directory, a non-positive or non-integer version)."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RegistryError(f"{name}: version must be a positive integer, got {version!r}")
        path = self._model_dir(name) / f"v{version:0{_VERSION_DIGITS}d}"
        if path.exists() and not path.resolve().is_relative_to(self.root):
            raise RegistryError(f"{path} resolves outside the registry root {self.root}")
        return path

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        """Serialise writers of one model (registration numbering, the production pointer)."""
        model_dir = self._model_dir(name)
        model_dir.mkdir(parents=True, exist_ok=True)
        with (model_dir / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield model_dir
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def versions(self, name: str) -> list[int]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            return []
        out = []
        for p in model_dir.iterdir():
            if p.name.startswith("v") and p.name[1:].isdigit() and (p / REGISTRATION).is_file():
                out.append(int(p.name[1:]))
        return sorted(out)

    # ------------------------------------------------------------------ reads
    def entry(self, name: str, version: int) -> RegistryEntry:
        path = self.version_dir(name, version)
        reg = path / REGISTRATION
        if not reg.is_file():
            raise RegistryError(f"{name} v{version} is not registered (no {reg})")
        raw = json.loads(reg.read_text())
        return RegistryEntry(
            name=name,
            version=version,
            path=path,
            artifact_version=raw["artifact_version"],
            metrics=raw.get("metrics", {}),
            data_snapshot=raw.get("data_snapshot", {}),
            registered_unix=raw.get("registered_unix", 0),
            source=raw.get("source", ""),
        )

    def _pointer(self, name: str) -> dict[str, Any]:
        path = self._model_dir(name) / PRODUCTION
        if not path.is_file():
            return {"version": None, "history": []}
        return dict(json.loads(path.read_text()))

    def production_version(self, name: str) -> int | None:
        """The production version number (None: nothing promoted yet). Cheap: one small read."""
        version = self._pointer(name)["version"]
        return None if version is None else int(version)

    def production_history(self, name: str) -> list[int]:
        """Production first, then the versions promoted before it, newest first (no repeats)."""
        out: list[int] = []
        for v in reversed(self._pointer(name)["history"]):
            if int(v) not in out:
                out.append(int(v))
        return out

    def production(self, name: str) -> RegistryEntry | None:
        version = self.production_version(name)
        return None if version is None else self.entry(name, version)

    def load(self, name: str, version: int) -> ModelArtifact:
        """The verified artifact of a version (every checksum checked; ``ArtifactError`` names
        the bad file)."""
        return load_artifact(self.entry(name, version).path)

    # ------------------------------------------------------------------ writes
    def register(
        self,
        name: str,
        artifact_dir: Path,
        *,
        metrics: dict[str, float] | None = None,
        data_snapshot: dict[str, Any] | None = None,
    ) -> RegistryEntry:
        """Verify ``artifact_dir``, copy it in as the next version, and record its metrics.

        Raises ``ArtifactError`` for a corrupt artifact (nothing is registered)."""
        artifact = load_artifact(Path(artifact_dir))  # checksums first: never register junk
        if (name == "retrieval") != ("index.faiss" in _manifest_files(artifact_dir)):
            raise RegistryError(
                f"{artifact_dir}: a {name!r} artifact "
                + ("must" if name == "retrieval" else "must not")
                + " contain a faiss index (index.faiss)"
            )
        with self._locked(name):
            version = max(self.versions(name), default=0) + 1
            final = self.version_dir(name, version)
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(artifact_dir, tmp, symlinks=False)
            load_artifact(tmp)  # the copy is what will be served: verify it too
            entry = RegistryEntry(
                name=name,
                version=version,
                path=final,
                artifact_version=artifact.version,
                metrics=dict(metrics or {}),
                data_snapshot=dict(data_snapshot or {}),
                registered_unix=int(time.time()),
                source=str(Path(artifact_dir).resolve()),
            )
            payload = entry.to_dict()
            payload.pop("path")
            _write_json_atomic(tmp / REGISTRATION, payload)
            tmp.rename(final)
        return entry

    def promote(
        self,
        name: str,
        version: int,
        *,
        gate: PromotionGate | None = None,
        force: bool = False,
        baseline: dict[str, float] | None = None,
    ) -> Promotion:
        """Make ``version`` production if its metrics pass ``gate`` against the current
        production's (or ``force``). Its files are verified first: a corrupt version is never
        promoted, forced or not.

        ``baseline``: production's metrics measured on the same data as the candidate's (a
        retrain evaluates both on the new test day); default: production's registered ones."""
        gate = gate or PromotionGate()
        candidate = self.entry(name, version)
        # Checksums, manifest and vocabularies, not the weights: the checksum already proves
        # they are the registered bytes, and the Ingress replicas that serve this call have no
        # torch (importing it here took the first promote past a 5 s client timeout in CI).
        load_artifact(candidate.path, weights=False)
        with self._locked(name) as model_dir:
            pointer = self._pointer(name)
            previous = pointer["version"]
            if previous == version:
                raise RegistryError(f"{name} v{version} is already in production")
            if previous is None:
                failures = []
            else:
                reference = self.entry(name, previous).metrics if baseline is None else baseline
                failures = gate.check(candidate.metrics, reference)
            if failures and not force:
                raise RegistryError(
                    f"{name} v{version} not promoted: the gate failed against production "
                    f"v{previous}:\n  " + "\n  ".join(failures)
                )
            _write_json_atomic(
                model_dir / PRODUCTION,
                {
                    "version": version,
                    "history": [*pointer["history"], version],
                    "updated_unix": int(time.time()),
                },
            )
            if self.shadow_version(name) == version:  # the candidate won: nothing left to shadow
                _write_json_atomic(
                    model_dir / SHADOW, {"version": None, "updated_unix": int(time.time())}
                )
        return Promotion(name, version, previous, failures, forced=bool(failures) and force)

    def rollback(self, name: str) -> Promotion:
        """Production goes back to the version promoted before the current one."""
        with self._locked(name) as model_dir:
            pointer = self._pointer(name)
            history = [int(v) for v in pointer["history"]]
            if len(history) < 2:
                raise RegistryError(f"{name}: no earlier production version to roll back to")
            current, target = history[-1], history[-2]
            # never roll back onto a corrupt copy (checksums; no torch, as in promote)
            load_artifact(self.entry(name, target).path, weights=False)
            _write_json_atomic(
                model_dir / PRODUCTION,
                {"version": target, "history": history[:-1], "updated_unix": int(time.time())},
            )
        return Promotion(name, target, current, [], forced=False)

    def shadow_version(self, name: str) -> int | None:
        """The version scored in shadow (None: none). Cheap: one small read."""
        path = self._model_dir(name) / SHADOW
        if not path.is_file():
            return None
        version = json.loads(path.read_text())["version"]
        return None if version is None else int(version)

    def set_shadow(self, name: str, version: int | None) -> int | None:
        """Score ``version`` in shadow from now on (None: stop); returns the previous shadow
        version. Its files are verified first, and the production version is refused (its
        scores are the served ones already)."""
        if version is not None:
            load_artifact(self.entry(name, version).path, weights=False)  # as in promote
        with self._locked(name) as model_dir:
            if version is not None and version == self.production_version(name):
                raise RegistryError(f"{name} v{version} is in production: nothing to shadow")
            previous = self.shadow_version(name)
            _write_json_atomic(
                model_dir / SHADOW, {"version": version, "updated_unix": int(time.time())}
            )
        return previous

    def list(self, name: str) -> list[tuple[RegistryEntry, bool]]:
        """Every registered version of ``name`` and whether it is production."""
        production = self.production_version(name)
        return [(self.entry(name, v), v == production) for v in self.versions(name)]


def _manifest_files(artifact_dir: Path) -> set[str]:
    try:
        return set(json.loads((Path(artifact_dir) / MANIFEST).read_text())["sha256"])
    except (OSError, ValueError, KeyError) as e:
        raise ArtifactError(f"{artifact_dir}: unreadable manifest ({e})") from e
