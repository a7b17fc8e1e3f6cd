"""The live view of a running sweep: one table of trials (state, step, val/ari, ...)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from core.names import short_names
from orchestrator.trial import STATUS_KEY

PENDING, RUNNING, DONE, FAILED, DIVERGED, STOPPED = (
    "PENDING", "RUNNING", "DONE", "FAILED", "DIVERGED", "STOPPED")
INTERRUPTED = "INTERRUPTED"  # running when the sweep was stopped; --resume continues it


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Trials this driver saw running and saw end (complete, stopped by the scheduler, or failed for
# good). A module-level record, not the callback's: on --resume Tune unpickles its own copy of
# the callback. A trial live but not ended when fit() returns was cut short by Ctrl-C / SIGTERM.
LIFECYCLE: dict[str, set[str]] = {"live": set(), "ended": set()}


def interrupted_trials() -> set[str]:
    """Trials of the last ``fit()`` that were running when it returned."""
    return LIFECYCLE["live"] - LIFECYCLE["ended"]


class ProgressTable(Callback):
    """Prints the trial table when a trial changes state, and at most every ``interval`` seconds
    when only results arrive."""

    def __init__(self, metrics: list[str], keys: list[str], interval: float = 10.0) -> None:
        self.metrics, self.keys, self.interval = metrics, keys, interval
        self.rows: dict[str, dict[str, Any]] = {}
        self._printed = 0.0

    def _row(self, trial: Any) -> dict[str, Any]:
        row = self.rows.setdefault(trial.trial_id, {"state": PENDING, "config": trial.config})
        row["config"] = trial.config
        return row

    def _show(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._printed < self.interval:
            return
        self._printed = now
        labels = short_names(self.keys)  # as MLflow's params and the report name them
        headers = ["trial", "state", "step", *(labels[k] for k in self.keys), *self.metrics]
        rows = [
            [tid, r["state"], fmt(r.get("step")), *(fmt(r["config"].get(k)) for k in self.keys),
             *(fmt(r.get(m)) for m in self.metrics)]
            for tid, r in sorted(self.rows.items())
        ]
        done = sum(r["state"] in (DONE, FAILED, DIVERGED, STOPPED) for r in self.rows.values())
        stream = sys.stdout  # looked up now: the callback is pickled with the Tuner
        print(f"\n[{time.strftime('%H:%M:%S')}] {done}/{len(self.rows)} trials finished",
              file=stream)
        print(format_table(headers, rows), file=stream, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        LIFECYCLE["live"].add(trial.trial_id)
        self._row(trial)["state"] = RUNNING
        self._show(force=True)

    def on_trial_restore(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        LIFECYCLE["live"].add(trial.trial_id)
        self._row(trial)["state"] = RUNNING

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        LIFECYCLE["live"].add(trial.trial_id)
        row = self._row(trial)
        row.update({k: result[k] for k in ("step", *self.metrics) if k in result})
        if result.get(STATUS_KEY) == "diverged":
            row["state"] = DIVERGED
        self._show(force=False)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        LIFECYCLE["ended"].add(trial.trial_id)
        row = self._row(trial)
        if row["state"] != DIVERGED:
            status = (trial.last_result or {}).get(STATUS_KEY)
            row["state"] = DONE if status == "done" else STOPPED
        self._show(force=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        LIFECYCLE["ended"].add(trial.trial_id)
        self._row(trial)["state"] = FAILED
        self._show(force=True)
