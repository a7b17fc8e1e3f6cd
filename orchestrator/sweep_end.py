"""The end of a sweep in MLflow: trials' kept values, best.json, the runs' ends, the best trial.

Every call here may meet a server that is gone; what could not be recorded is returned, one
phrase per run, for the sweep's one closing line (its results stay on disk either way).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from core.errors import one_line
from core.names import BEST_JSON, TAG_PARTIAL
from orchestrator.mlflow_runs import ARTIFACT_CHECKPOINT, finish_run, upload_once
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
