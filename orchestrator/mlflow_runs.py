"""A sweep's MLflow runs, on :class:`mlflow.MlflowClient` (no fluent state, no autolog).

One sweep is a parent run (``slotsweep.kind=sweep``, found again by ``slotsweep.sweep_key``);
each trial is a child run found again by ``(mlflow.parentRunId, trial_id)``, so a restored sweep
logs into the runs it started. Params are logged flattened, within MLflow's length limits.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Param, Run, RunTag

from core.errors import SlotsweepError
from core.names import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    TAG_GIT,
    TAG_KIND,
    TAG_PARENT,
    TAG_SWEEP,
    TAG_SWEEP_KEY,
    TAG_TRIAL,
    UI_VIEW,
)
from orchestrator import PROJECT_DIR

ARTIFACT_CONFIG = "config"  # a run's artifact folders
ARTIFACT_VISUALS = "visualizations"
ARTIFACT_CHECKPOINT = "checkpoints"
PARAM_CHANGED_PREFIX = "param_changed."
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE, BATCH = 250, 6000, 8000, 100  # MLflow's limits


def quiet_mlflow() -> None:
    """No run links, progress bars or INFO lines from MLflow on our users' terminals."""
    import logging

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def filter_value(value: str, what: str) -> str:
    """``value`` quoted for an MLflow search filter (``what`` names it in the error)."""
    if "'" in value or "\\" in value:
        raise SlotsweepError(f"{what} {value!r} must not contain quotes or backslashes")
    return f"'{value}'"


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing; a deleted one is an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:  # tagged so MLflow 3's UI opens its model-training view, not GenAI traces
            return client.create_experiment(name, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise SlotsweepError(f"MLflow experiment {name!r} is deleted: restore it (mlflow "
                             f"experiments restore --experiment-id {experiment.experiment_id}) or "
                             "pick another experiment name")
    return experiment.experiment_id


def git_commit(cwd: Path = PROJECT_DIR) -> str | None:
    """``git rev-parse HEAD`` of the project, or None (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def client_for(tracking_uri: str) -> MlflowClient:
    """A client of ``tracking_uri`` (tracking and registry), no global MLflow state touched."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _find(client: MlflowClient, experiment_id: str, filters: dict[str, str]) -> Run | None:
    query = " AND ".join(f'tags."{k}" = {filter_value(v, k)}' for k, v in filters.items())
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                               max_results=1)
    return found[0] if found else None


def _find_or_create(client: MlflowClient, experiment_id: str, filters: dict[str, str],
                    run_name: str, tags: dict[str, str]) -> str:
    run = _find(client, experiment_id, filters)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return client.create_run(experiment_id, tags={**tags, **filters},
                             run_name=run_name).info.run_id


def get_or_create_sweep_run(client: MlflowClient, experiment_id: str, sweep_key: str,
                            sweep_name: str, tags: dict[str, str] | None = None) -> str:
    """The parent run of the sweep ``sweep_key`` (newest one, RUNNING again), or a new one."""
    extra = {TAG_SWEEP: sweep_name, **(tags or {})}
    if (sha := git_commit()) is not None:
        extra.setdefault(TAG_GIT, sha)
    filters = {TAG_SWEEP_KEY: sweep_key, TAG_KIND: "sweep"}
    return _find_or_create(client, experiment_id, filters, sweep_name, extra)


def get_or_create_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                            trial_id: str, run_name: str, tags: dict[str, str] | None = None
                            ) -> str:
    """The child run of ``trial_id`` under ``parent_run_id``, reused (RUNNING again) or new.

    The run's identity is ``(mlflow.parentRunId, trial_id)`` in MLflow itself, not a dict in
    memory: Ray's MLflowLoggerCallback keeps trial -> run only in memory, so after
    ``Tuner.restore`` it opens a second run per trial (the known "duplicate runs" bug). Here a
    restored or retried trial finds and continues its own run.
    """
    return _find_or_create(client, experiment_id, _trial_filters(parent_run_id, trial_id),
                           run_name, dict(tags or {}))


def _trial_filters(parent_run_id: str, trial_id: str) -> dict[str, str]:
    return {TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_KIND: "trial"}


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                   trial_id: str) -> str | None:
    """The run id of ``trial_id`` under ``parent_run_id``, or None; creates and changes nothing."""
    run = _find(client, experiment_id, _trial_filters(parent_run_id, trial_id))
    return run.info.run_id if run is not None else None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _param_text(value: Any) -> str:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log (nested dicts flattened with dots, lists as JSON, MLflow's length limits) params.

    Params the run already has with the same value are skipped, so a resumed trial logs again
    without MLflow's "Changing param values is not allowed". A different value (PBT mutations, a
    changed resume) is not an error: it is recorded as tag ``param_changed.<key>`` = new value,
    the param keeps its first value. Returns the changed keys.
    """
    existing = client.get_run(run_id).data.params
    new: dict[str, str] = {}
    changed: dict[str, str] = {}
    for raw_key, raw_value in _flat(params):
        key, value = _clip(str(raw_key), MAX_KEY), _clip(_param_text(raw_value), MAX_PARAM_VALUE)
        if key not in existing:
            new[key] = value
        elif existing[key] != value:
            changed[key] = value
    entities: list[Param | RunTag] = [Param(k, v) for k, v in new.items()]
    entities += [RunTag(_clip(PARAM_CHANGED_PREFIX + k, MAX_KEY), _clip(v, MAX_TAG_VALUE))
                 for k, v in changed.items()]
    for start in range(0, len(entities), BATCH):
        chunk = entities[start : start + BATCH]
        client.log_batch(run_id, params=[e for e in chunk if isinstance(e, Param)],
                         tags=[e for e in chunk if isinstance(e, RunTag)])
    return list(changed)


def finish_run(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run as FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise SlotsweepError(f"run status {status!r} is not FINISHED, FAILED or KILLED")
    client.set_terminated(run_id, status=status)


def runs_of_sweep(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every (not deleted) child run of a sweep run, oldest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], f'tags."{TAG_PARENT}" = '
                                  f"{filter_value(parent_run_id, 'run id')}",
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def upload_once(client: MlflowClient, run_id: str, path: str | Path, folder: str) -> str:
    """Log the file ``path`` into ``folder`` of run ``run_id`` unless it is there already (an
    artifact upload leaves the run's status and times as they are); its ``runs:/`` URI."""
    artifact = f"{folder}/{Path(path).name}"
    if artifact not in {a.path for a in client.list_artifacts(run_id, folder)}:
        client.log_artifact(run_id, str(path), folder)
    return f"runs:/{run_id}/{artifact}"


def run_link(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """A browser link to an experiment (or one of its runs) in MLflow's UI at ``base``, in its
    model-training view (MLflow 3 opens GenAI traces by default); ``base`` "" gives the
    in-UI link a run description uses."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/{page}?{UI_VIEW}" if base else f"{page}?{UI_VIEW}"
