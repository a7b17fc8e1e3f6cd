"""What a finished (or interrupted) sweep found: each trial's outcome at its best reported step,
the best trial by the sweep's selection rule, and the final table."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from core.errors import SlotsweepError, one_line
from core.names import (
    BEST_CHECKPOINT_FILE,
    CHECKPOINTS_DIRNAME,
    METRIC_ARI,
    METRIC_MBO,
    short_names,
)
from core.text import fmt, format_table
from core.training.selection import selection_key
from orchestrator import spec as specs
from orchestrator.progress import DIVERGED, DONE, FAILED, STOPPED
from orchestrator.spec_check import max_steps
from orchestrator.trial import CACHE_KEY, ERROR_KEY, STATUS_KEY, TRIAL_JSON, run_dir_of


def _key(spec: specs.SweepSpec, metrics: dict[str, Any]) -> tuple[float, float]:
    return selection_key(metrics, spec.select.metric, spec.select.mode, spec.select.tie_break)


def trial_error(error: BaseException) -> str:
    """A failed trial's reason in one line: slotsweep's own message as it is (``could not write
    checkpoint ...``), anything else as the traceback's last line (``RuntimeError: ...``)."""
    cause = getattr(error, "cause", None) or error  # Ray wraps it in a RayTaskError
    if isinstance(cause, SlotsweepError):
        return one_line(cause, 300)
    return str(error).strip().splitlines()[-1][:300]


def summarize_trial(spec: specs.SweepSpec, sweep_dir: Path, result: Any) -> dict[str, Any]:
    """One trial's outcome: status, sampled values, its best reported step, checkpoint, run."""
    trial_id = result.metrics.get("trial_id") or Path(result.path).name.split("_", 2)[-1]
    run_dir = run_dir_of(sweep_dir, trial_id)
    info = json.loads((run_dir / TRIAL_JSON).read_text()) if (run_dir / TRIAL_JSON).is_file() \
        else {}
    status = result.metrics.get(STATUS_KEY)
    if result.error is not None:
        state, error = FAILED, trial_error(result.error)
    elif status == "diverged":
        state, error = DIVERGED, result.metrics.get(ERROR_KEY)
    else:
        last = result.metrics.get("step") or 0
        planned = result.config.get("trainer.max_steps") or max_steps(spec)
        state, error = (DONE if status == "done" or last >= planned else STOPPED), None
    best: dict[str, Any] | None = None
    frame = result.metrics_dataframe
    if frame is not None and spec.select.metric in frame:
        for row in frame.to_dict("records"):
            value = row.get(spec.select.metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if best is None or _key(spec, row) > _key(spec, best):
                best = row
    checkpoint = run_dir / CHECKPOINTS_DIRNAME / BEST_CHECKPOINT_FILE
    wanted = (spec.select.metric, spec.select.tie_break, METRIC_ARI, METRIC_MBO)
    metric_keys = [m for m in wanted if m]
    return {
        "trial_id": trial_id,
        "index": info.get("index"),
        "state": state,
        "error": error,
        "sampled": {k: result.config.get(k) for k in spec.search},
        "step": int(best["step"]) if best and "step" in best else None,
        "metrics": {m: best.get(m) for m in dict.fromkeys(metric_keys)} if best else {},
        "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
        "mlflow_run_id": info.get("mlflow_run_id"),
        "seed": info.get("seed"),
        "run_dir": str(run_dir),
        "feature_cache": result.metrics.get(CACHE_KEY),
    }


def select_best(spec: specs.SweepSpec, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best trial over all reported steps (selection metric, then tie-break)."""
    scored = [t for t in trials if t["metrics"].get(spec.select.metric) is not None]
    if not scored:
        return None
    return max(scored, key=lambda t: _key(spec, t["metrics"]))


def print_summary(spec: specs.SweepSpec, trials: list[dict[str, Any]], best: dict | None,
                  stream: TextIO) -> None:
    keys = list(spec.search)
    metrics = list(dict.fromkeys(m for m in (spec.select.metric, spec.select.tie_break,
                                             METRIC_ARI, METRIC_MBO) if m))
    labels = short_names(keys)
    headers = ["trial", "state", "best step", *(labels[k] for k in keys), *metrics,
               "checkpoint", "mlflow run"]
    rows = []
    for t in sorted(trials, key=lambda t: (t["index"] is None, t["index"], t["trial_id"])):
        mark = "*" if best is not None and t["trial_id"] == best["trial_id"] else ""
        rows.append([mark + t["trial_id"], t["state"], fmt(t["step"]),
                     *(fmt(t["sampled"].get(k)) for k in keys),
                     *(fmt(t["metrics"].get(m)) for m in metrics),
                     t["checkpoint"] or "-", t["mlflow_run_id"] or "-"])
    print(f"\nsweep {spec.name}: {len(trials)} trials (metrics and checkpoint at each trial's "
          f"best step by {spec.select.mode} {spec.select.metric}; * the best trial)", file=stream)
    print(format_table(headers, rows), file=stream)
    for t in trials:
        if t["error"]:
            print(f"  {t['trial_id']} {t['state'].lower()}: {t['error']}", file=stream)
