"""Records every training, tuning and evaluation run in MLflow.

The store is a SQLite database plus an artifact folder inside the run directory, so it works
offline on a laptop and is browsed with MLflow's own UI::

    mlflow ui --backend-store-uri sqlite:///runs/demo/mlflow.db   # needs the full `mlflow`

Point ``FEEDREC_TRACKING_URI`` at a tracking server to share runs across a team instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from feedrec.artifacts import ModelArtifact

ENV_URI = "FEEDREC_TRACKING_URI"


def data_snapshot_id(data_root: Path) -> str:
    """A content id of a preprocessed dataset: sha256 over its meta and vocabularies (12 hex)."""
    digest = hashlib.sha256()
    for name in ("meta.json", "vocabularies.npz"):
        path = Path(data_root) / name
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


class ExperimentTracker:
    """One MLflow experiment per model kind (``feedrec-ranker``, ``feedrec-two_tower`` ...).

    Args:
        run_root: the feedrec run directory; holds ``mlflow.db`` and ``mlruns/`` by default.
        uri: an MLflow tracking URI overriding the default (also read from the environment).
    """

    def __init__(self, run_root: Path, uri: str | None = None) -> None:
        root = Path(run_root).resolve()
        self.uri = uri or os.environ.get(ENV_URI) or f"sqlite:///{root / 'mlflow.db'}"
        self.artifact_root = (root / "mlruns").as_uri()

    def _client(self) -> Any:
        import mlflow
        from mlflow.tracking import MlflowClient

        # Alembic logs every schema migration of a fresh database at INFO.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        mlflow.set_tracking_uri(self.uri)
        return MlflowClient(self.uri)

    def _experiment(self, client: Any, name: str) -> str:
        existing = client.get_experiment_by_name(name)
        if existing is not None:
            return str(existing.experiment_id)
        return str(client.create_experiment(name, artifact_location=self.artifact_root))

    def log_run(
        self,
        experiment: str,
        run_name: str,
        *,
        params: dict[str, Any],
        history: list[dict[str, float]] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        artifact_dirs: dict[str, Path] | None = None,
    ) -> str:
        """Create a finished run; returns its MLflow run id.

        ``params`` may nest (flattened to ``a.b``); ``history`` is one metrics dict per epoch
        (logged with the epoch as step); ``artifact_dirs`` are copied under the given names.
        """
        client = self._client()
        run = client.create_run(self._experiment(client, experiment), run_name=run_name)
        run_id = str(run.info.run_id)
        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        for key, value in flat.items():
            client.log_param(run_id, key, str(value)[:6000])
        for step, row in enumerate(history or []):
            for key, value in row.items():
                if isinstance(value, int | float):
                    client.log_metric(run_id, key, float(value), step=step)
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, float(value))
        for key, value in (tags or {}).items():
            client.set_tag(run_id, key, value)
        for name, directory in (artifact_dirs or {}).items():
            client.log_artifacts(run_id, str(directory), artifact_path=name)
        client.set_terminated(run_id)
        return run_id

    def log_training(self, artifact: ModelArtifact, *, data_root: Path) -> str:
        """A trained model artifact: resolved train + model config, library versions, data
        snapshot, per-epoch history, calibration and the artifact files themselves."""
        meta = artifact.metadata
        model_config = {k: v for k, v in vars(artifact.model_config).items() if k != "num_rows"} | {
            "num_rows": artifact.model_config.num_rows
        }
        last = meta["history"][-1] if meta.get("history") else {}
        final = {f"final_{k}": v for k, v in last.items() if isinstance(v, int | float)}
        final["train_seconds"] = float(meta.get("train_seconds", 0.0))
        for task, row in (meta.get("calibration") or {}).items():
            final[f"valid_ece_{task}"] = row["valid_ece_after"]
        tags = {
            "feedrec.kind": artifact.kind,
            "feedrec.artifact_version": artifact.version,
            "feedrec.artifact_path": str(artifact.root),
            "feedrec.data_snapshot": data_snapshot_id(data_root),
            "feedrec.device": str(meta.get("device", "")),
            "feedrec.restores": str(meta.get("restores", 0)),
            **{f"version.{name}": v for name, v in artifact.versions.items()},
        }
        return self.log_run(
            f"feedrec-{artifact.kind}",
            f"{artifact.kind}-{artifact.version}",
            params={"train": meta.get("train_config", {}), "model": model_config},
            history=meta.get("history"),
            metrics=final,
            tags=tags,
            artifact_dirs={"model": artifact.root},
        )
