"""Every training run lands in MLflow with its config, versions, data snapshot and history."""

from __future__ import annotations

from pathlib import Path

from feedrec.artifacts import load_artifact
from feedrec.runtime import RunLayout
from feedrec.tracking import ExperimentTracker, data_snapshot_id


def test_training_runs_are_tracked(trained_run: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = RunLayout(trained_run)
    client = MlflowClient(ExperimentTracker(run.root).uri)
    for kind, root in (("ranker", run.ranker), ("two_tower", run.two_tower)):
        artifact = load_artifact(root)
        experiment = client.get_experiment_by_name(f"feedrec-{kind}")
        assert experiment is not None
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`feedrec.artifact_version` = '{artifact.version}'",
        )
        assert len(runs) == 1, f"{kind}: expected one run of {artifact.version}"
        tracked = runs[0]
        assert tracked.data.tags["feedrec.data_snapshot"] == data_snapshot_id(run.data)
        assert tracked.data.tags["version.torch"].startswith("2.")
        assert tracked.data.params["train.batch_size"] == str(
            artifact.metadata["train_config"]["batch_size"]
        )
        epochs = artifact.metadata["train_config"]["epochs"]
        losses = client.get_metric_history(tracked.info.run_id, "train_loss")
        assert [m.step for m in losses] == list(range(epochs))
        files = {f.path for f in client.list_artifacts(tracked.info.run_id, "model")}
        assert "model/manifest.json" in files and "model/weights.pt" in files
