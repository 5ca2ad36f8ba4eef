"""Experiment tracking in MLflow (runs, params, metrics, artifacts) for every training job."""

from feedrec.tracking.tracker import ExperimentTracker, data_snapshot_id

__all__ = ["ExperimentTracker", "data_snapshot_id"]
