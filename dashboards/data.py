"""What a sweep report shows, gathered once: the sweep's file (what was searched), each trial's
folder (sampled values, MLflow run, final report) and ``best.json`` when the sweep has ended,
each trial run's metric history, and the registered versions and reruns that came from it.

Works while the sweep runs: a trial without a final report is ``RUNNING`` and its best step
comes from the history logged so far.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.names import (
    BEST_CHECKPOINT_FILE,
    BEST_JSON,
    CHECKPOINTS_DIRNAME,
    DOWNSTREAM_JSON,
    METRIC_ARI,
    METRIC_MBO,
    TAG_KIND,
    TAG_PARENT,
    TAG_RERUN_OF,
    TAG_SWEEP,
    VERSION_SWEEP,
    VERSION_TRIAL,
    downstream_metric,
    short_names,
)
from core.training.selection import selection_key
from orchestrator.progress import DIVERGED, DONE, FAILED, STOPPED
from orchestrator.trial import DONE_JSON, RUN_DIRNAME, STATUS_KEY, TRIAL_JSON

RUNNING = "RUNNING"
CURVES = (METRIC_ARI, METRIC_MBO)  # the metrics drawn over steps and compared across trials


@dataclass
class Trial:
    """One trial as the report shows it."""

    trial_id: str
    index: int | None
    state: str  # DONE, STOPPED (by the scheduler), DIVERGED, FAILED, RUNNING, INTERRUPTED
    sampled: dict[str, Any]
    run_id: str | None
    run_dir: Path
    step: int | None = None  # the best step by the sweep's selection rule
    metrics: dict[str, float] = field(default_factory=dict)  # at that step
    last_step: int | None = None
    checkpoint: Path | None = None
    error: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    versions: list[str] = field(default_factory=list)  # "NAME v3 @champion"
    reruns: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SweepData:
    """A sweep at the moment the report is built."""

    name: str
    sweep_dir: Path
    metric: str
    mode: str
    tie_break: str | None
    search: dict[str, Any]  # key -> orchestrator.spec_check.Distribution
    trials: list[Trial]
    planned: int
    complete: bool
    best_id: str | None
    tracking_uri: str | None
    ui_uri: str | None  # where a browser reaches MLflow (links), or None
    experiment_id: str | None
    parent_run_id: str | None
    # slotsweep evaluate-sweep's numbers: task -> {label, headline, trials: {id: {metrics}}}
    downstream: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        """Each searched key's short name (``tau_ss``), as the trials' MLflow params name it."""
        return short_names(list(self.search))

    def trial(self, trial_id: str) -> Trial:
        return next(t for t in self.trials if t.trial_id == trial_id)


def _history(client: Any, run_id: str | None, key: str) -> list[tuple[int, float]]:
    if client is None or run_id is None:
        return []
    points = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    return sorted((s, v) for s, v in points.items() if not math.isnan(v))


def best_of(curves: dict[str, list[tuple[int, float]]], metric: str, mode: str,
            tie_break: str | None) -> tuple[int | None, dict[str, float]]:
    """The best step of a trial's histories by the selection rule, and the metrics there."""
    by_step: dict[int, dict[str, float]] = {}
    for key, points in curves.items():
        for step, value in points:
            by_step.setdefault(step, {})[key] = value
    scored = [(s, m) for s, m in by_step.items() if metric in m]
    if not scored:
        return None, {}
    step, values = max(scored, key=lambda sm: (selection_key(sm[1], metric, mode, tie_break),
                                               -sm[0]))
    return step, values


def _state(record_trial: dict[str, Any] | None, run_dir: Path, status: str | None) -> str:
    if record_trial is not None:
        return record_trial["state"]
    done = run_dir / DONE_JSON
    if done.is_file():
        final = json.loads(done.read_text())
        return DIVERGED if final.get(STATUS_KEY) == "diverged" else DONE
    return {"FAILED": FAILED, "KILLED": STOPPED}.get(status or "", RUNNING)


def collect(sweep_dir: Path, client: Any | None, ui_uri: str | None = None,
            spec: Any | None = None) -> SweepData:
    """Everything the report shows of the sweep in ``sweep_dir``; ``client``: an MlflowClient
    (None: from the folders alone, without curves); ``spec``: the sweep's file, already loaded
    (default: read from the folder)."""
    if spec is None:
        from orchestrator.spec import load_sweep
        from orchestrator.sweep import SPEC_YAML

        spec = load_sweep(sweep_dir / SPEC_YAML)
    best_json = sweep_dir / BEST_JSON
    record = json.loads(best_json.read_text()) if best_json.is_file() else None
    listed = {t["trial_id"]: t for t in (record or {}).get("trials", [])}
    mlflow = dict((record or {}).get("mlflow", {}))
    if record is None and client is not None:  # running: the sweep's run is found by its tags
        mlflow.update(_sweep_run(client, spec.mlflow.experiment, spec.name))
    keys = [k for k in dict.fromkeys((spec.select.metric, spec.select.tie_break, *CURVES)) if k]
    statuses = _statuses(client, mlflow.get("experiment_id"), mlflow.get("parent_run_id"))
    downstream = _downstream(sweep_dir)
    trials = []
    for info_path in sorted((sweep_dir / RUN_DIRNAME).glob(f"*/{TRIAL_JSON}")):
        info = json.loads(info_path.read_text())
        run_dir, run_id = info_path.parent, info.get("mlflow_run_id")
        status = statuses.get(run_id) if run_id else None
        if client is not None and run_id and status is None:  # not nested under the sweep's run
            status = client.get_run(run_id).info.status
        trial = Trial(trial_id=info["trial_id"], index=info.get("index"),
                      state=_state(listed.get(info["trial_id"]), run_dir, status),
                      sampled={k: info.get("sampled", {}).get(k) for k in spec.search},
                      run_id=run_id, run_dir=run_dir)
        trial.curves = {k: _history(client, run_id, k) for k in keys}
        steps = [s for points in trial.curves.values() for s, _ in points]
        trial.last_step = max(steps) if steps else None
        trial.step, trial.metrics = best_of(trial.curves, spec.select.metric, spec.select.mode,
                                            spec.select.tie_break)
        if trial.trial_id in listed:  # the sweep's own record wins (it read Tune's results)
            kept = listed[trial.trial_id]
            trial.step = kept.get("step", trial.step)
            trial.metrics = {k: v for k, v in kept.get("metrics", {}).items() if v is not None} \
                or trial.metrics
            trial.error = kept.get("error")
        best = run_dir / CHECKPOINTS_DIRNAME / BEST_CHECKPOINT_FILE
        trial.checkpoint = best if best.is_file() else None
        for task, done in downstream.items():  # its headline number beside val/ari
            got = done["trials"].get(trial.trial_id)
            if got is not None and done["headline"] in got["metrics"]:
                trial.metrics[downstream_metric(task, done["headline"])] = \
                    got["metrics"][done["headline"]]
        trials.append(trial)
    trials.sort(key=lambda t: (t.index if t.index is not None else 1 << 30, t.trial_id))
    data = SweepData(
        name=spec.name, sweep_dir=sweep_dir, metric=spec.select.metric, mode=spec.select.mode,
        tie_break=spec.select.tie_break, search=dict(spec.search), trials=trials,
        planned=int(spec.trials), complete=bool(record and record.get("complete")),
        best_id=(record or {}).get("best", {}).get("trial_id") if record and record.get("best")
        else _leader(trials, spec.select.metric, spec.select.mode, spec.select.tie_break),
        tracking_uri=mlflow.get("tracking_uri"), ui_uri=ui_uri,
        experiment_id=mlflow.get("experiment_id"), parent_run_id=mlflow.get("parent_run_id"),
        downstream=downstream,
    )
    if client is not None:
        _lineage(data, client)
    return data


def _downstream(sweep_dir: Path) -> dict[str, Any]:
    """``<sweep>/downstream.json`` (written by slotsweep evaluate-sweep), or nothing."""
    path = sweep_dir / DOWNSTREAM_JSON
    try:
        found = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}  # not JSON (evaluate-sweep writes it atomically): shown as no numbers
    return found if isinstance(found, dict) else {}


def _sweep_run(client: Any, experiment: str, name: str) -> dict[str, str]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs(
        [found.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.`{TAG_KIND}` = 'sweep' and tags.`{TAG_SWEEP}` = '{name}'")
    ids = {"experiment_id": found.experiment_id}
    return {**ids, "parent_run_id": runs[0].info.run_id} if runs else ids


def _statuses(client: Any | None, experiment_id: str | None,
              parent_run_id: str | None) -> dict[str, str]:
    """Each trial run's status in one query: the runs nested under the sweep's run."""
    if client is None or experiment_id is None or parent_run_id is None:
        return {}
    runs = client.search_runs([experiment_id], max_results=10000,
                              filter_string=f"tags.`{TAG_PARENT}` = '{parent_run_id}'")
    return {r.info.run_id: r.info.status for r in runs}


def _leader(trials: list[Trial], metric: str, mode: str, tie_break: str | None) -> str | None:
    scored = [t for t in trials if metric in t.metrics]
    if not scored:
        return None
    return max(scored, key=lambda t: selection_key(t.metrics, metric, mode, tie_break)).trial_id


def _lineage(data: SweepData, client: Any) -> None:
    """Registered versions whose ``trial`` tag names a trial of this sweep, with their aliases;
    reruns of each trial run with their best-metric differences."""
    by_id = {t.trial_id: t for t in data.trials}
    try:
        versions = client.search_model_versions(f"tags.`{VERSION_SWEEP}` = '{data.name}'")
    except Exception:  # a store without a registry: no lineage to show
        versions = []
    for version in versions:
        trial = by_id.get(version.tags.get(VERSION_TRIAL, ""))
        if trial is None:
            continue
        model = client.get_registered_model(version.name)
        aliases = sorted(a for a, v in (model.aliases or {}).items() if str(v) == version.version)
        label = f"{version.name} v{version.version}" + "".join(f" @{a}" for a in aliases)
        trial.versions.append(label)
    runs = [t.run_id for t in data.trials if t.run_id]
    if not runs or data.experiment_id is None:
        return
    found = client.search_runs([data.experiment_id],
                               filter_string=f"tags.{TAG_RERUN_OF} != ''", max_results=1000)
    by_run = {t.run_id: t for t in data.trials if t.run_id}
    for run in found:
        trial = by_run.get(run.data.tags.get(TAG_RERUN_OF))
        if trial is None:
            continue
        curves = {k: _history(client, run.info.run_id, k) for k in CURVES}
        _, metrics = best_of(curves, data.metric, data.mode, data.tie_break)
        trial.reruns.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "metrics": metrics,
            "diff": {k: metrics[k] - trial.metrics[k] for k in CURVES
                     if k in metrics and k in trial.metrics},
        })
