"""Reading what a sweep logged to MLflow (shared by the sweep and submit tests)."""

from __future__ import annotations

from mlflow import MlflowClient

from core.names import TAG_KIND


def sweep_runs(uri: str, experiment: str) -> tuple[list, list]:
    """(sweep runs, trial runs) of an MLflow experiment, told apart by their kind tag."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_KIND) == "sweep"]
    children = [r for r in runs if r.data.tags.get(TAG_KIND) == "trial"]
    return parents, children
