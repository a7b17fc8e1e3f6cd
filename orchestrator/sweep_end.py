"""The end of a sweep in MLflow: trials' kept values, best.json, the runs' ends, the best trial.

Every call here may meet a server that is gone; what could not be recorded is returned, one
phrase per run, for the sweep's one closing line (its results stay on disk either way).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

from core.errors import one_line
from core.names import (
    BEST_JSON,
    REPORT_HTML,
    TAG_BEST_STEP,
    TAG_NOTE,
    TAG_PARTIAL,
    TAG_SWEEP_BEST,
    short_names,
)
from core.text import fmt
from orchestrator.mlflow_runs import ARTIFACT_CHECKPOINT, finish_run, run_link, upload_once
from orchestrator.mlflow_sender import ArtifactUploader, send_saved, short_http_retries
from orchestrator.progress import DIVERGED, DONE, FAILED, INTERRUPTED, STOPPED


def _close_trial_runs(client: Any, trials: list[dict[str, Any]]) -> None:
    """Trials the scheduler stopped were ended from outside: close their runs here and give
    them their best checkpoint, as finished trials have."""
    status = {DONE: "FINISHED", STOPPED: "KILLED", FAILED: "FAILED", DIVERGED: "FAILED",
              INTERRUPTED: "KILLED"}
    for t in trials:
        run_id = t["mlflow_run_id"]
        if not run_id:
            continue
        if t["state"] in (DONE, STOPPED) and t["checkpoint"]:
            upload_once(client, run_id, t["checkpoint"], ARTIFACT_CHECKPOINT)
        if client.get_run(run_id).info.status == "RUNNING":
            finish_run(client, run_id, status[t["state"]])


def record_end(client: Any, uri: str, parent: str, sweep_dir: Path,
               trials: list[dict[str, Any]], best: dict[str, Any] | None, status: str,
               partial: str) -> list[str]:
    """Put the sweep's end into MLflow: values trials kept while the server was away, best.json,
    the trial runs' ends, the best trial's metrics and tags, the parent run's status. Returns
    what MLflow still misses, one phrase per run (empty: everything is recorded)."""
    missing = []
    with short_http_retries():
        for t in trials:
            run_dir, run_id = Path(t["run_dir"]), t["mlflow_run_id"]
            upload = (functools.partial(ArtifactUploader(run_id).upload, client, run_dir) if run_id
                      else None)
            left = send_saved(client, run_dir, upload)
            if left:
                missing.append(f"for run {t['mlflow_run_id']} (trial {t['trial_id']}) {left}")
        try:
            client.log_artifact(parent, str(sweep_dir / BEST_JSON))
            _close_trial_runs(client, trials)
            _mark_bests(client, trials, best)
            client.set_tag(parent, TAG_NOTE, sweep_description(
                client.get_run(parent).info.experiment_id, trials, best, status))
            if best is not None:
                for name, value in best["metrics"].items():
                    if value is not None:
                        client.log_metric(parent, f"best/{name}", float(value))
                client.set_tag(parent, "best_trial", best["trial_id"])
                if best["mlflow_run_id"]:
                    client.set_tag(parent, "best_run_id", best["mlflow_run_id"])
            client.set_tag(parent, TAG_PARTIAL, partial)
            finish_run(client, parent, status)
        except Exception as exc:
            missing.append(f"the end of the sweep run {parent} ({one_line(exc)})")
    return missing


def _mark_bests(client: Any, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """Each trial run gets its best values (``best/val/ari`` ... at its best step, not only the
    last ones) and whether it is the sweep's best trial: one call per run."""
    for t in trials:
        if not t["mlflow_run_id"]:
            continue
        step = int(t["step"]) if t.get("step") is not None else 0
        metrics = [Metric(f"best/{k}", float(v), int(time.time() * 1000), step)
                   for k, v in (t.get("metrics") or {}).items() if v is not None]
        tags = [RunTag(TAG_SWEEP_BEST, str(best is not None
                                           and t["trial_id"] == best["trial_id"]).lower())]
        if t.get("step") is not None:
            tags.append(RunTag(TAG_BEST_STEP, str(step)))
        client.log_batch(t["mlflow_run_id"], metrics=metrics, tags=tags)


def sweep_description(experiment_id: str, trials: list[dict[str, Any]],
                      best: dict[str, Any] | None, status: str, top: int = 20) -> str:
    """The sweep run's description in MLflow's UI (markdown): the best trial with a link to its
    run, the leaderboard's first ``top`` rows, where the report is."""
    keys = list(dict.fromkeys(k for t in trials for k in (t.get("sampled") or {})))
    labels = short_names(keys)
    metrics = list(dict.fromkeys(m for t in trials for m in (t.get("metrics") or {})))
    scored = [t for t in trials if t.get("metrics")]
    order = [t for t in ([best] if best else []) if t in scored]
    order += [t for t in scored if t not in order]
    lines = [f"**Sweep {status.lower()}**: {len(trials)} trials."]
    if best is not None:
        link = (f"[{best['trial_id']}]({run_link('', experiment_id, best['mlflow_run_id'])})"
                if best.get("mlflow_run_id") else best["trial_id"])
        values = ", ".join(f"{k}={fmt(v)}" for k, v in best["metrics"].items())
        lines.append(f"Best trial: {link} at step {best['step']}: {values}.")
    lines += ["", "| trial | " + " | ".join([*(labels[k] for k in keys), *metrics, "step",
                                             "state"]) + " |",
              "|" + "---|" * (len(keys) + len(metrics) + 3)]
    for t in order[:top]:
        cells = [fmt((t.get("sampled") or {}).get(k)) for k in keys]
        cells += [fmt(t["metrics"].get(m)) for m in metrics]
        lines.append(f"| {t['trial_id']} | " + " | ".join(
            [*cells, fmt(t.get("step")), t["state"].lower()]) + " |")
    if len(order) > top:
        lines.append(f"\n{len(order) - top} more trials in `{BEST_JSON}` (Artifacts).")
    lines.append("\nThe whole report (effects, Pareto front, curves, masks): artifact "
                 f"`{REPORT_HTML}` of this run, or `slotsweep report SWEEP`.")
    return "\n".join(lines)
