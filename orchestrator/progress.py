"""The live view of a running sweep: one table of trials (state, step, val/ari, ...)."""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from core.names import short_names
from core.text import duration, fmt, format_table
from core.training.selection import selection_key
from orchestrator.trial import STATUS_KEY

PENDING, RUNNING, DONE, FAILED, DIVERGED, STOPPED = (
    "PENDING", "RUNNING", "DONE", "FAILED", "DIVERGED", "STOPPED")
INTERRUPTED = "INTERRUPTED"  # running when the sweep was stopped; --resume continues it


# Trials this driver saw running and saw end (complete, stopped by the scheduler, or failed for
# good). A module-level record, not the callback's: on --resume Tune unpickles its own copy of
# the callback. A trial live but not ended when fit() returns was cut short by Ctrl-C / SIGTERM.
LIFECYCLE: dict[str, set[str]] = {"live": set(), "ended": set()}


def interrupted_trials() -> set[str]:
    """Trials of the last ``fit()`` that were running when it returned."""
    return LIFECYCLE["live"] - LIFECYCLE["ended"]


ENDED = (DONE, FAILED, DIVERGED, STOPPED)


class ProgressTable(Callback):
    """Prints the trial table when a trial changes state, and at most every ``interval`` seconds
    when only results arrive, under a line with the trials finished / running / pending of the
    planned total, the best so far (``metrics[0]`` by ``mode``, ties by ``metrics[1]``), the time
    since this run of the sweep started and an ETA from the steps trained since then."""

    # defaults for a table unpickled by --resume from a sweep begun by an older slotsweep
    planned, max_steps, mode, _start, _base_steps = 0, 0, "max", 0.0, 0

    def __init__(self, metrics: list[str], keys: list[str], interval: float = 10.0,
                 planned: int = 0, max_steps: int = 0, mode: str = "max") -> None:
        self.metrics, self.keys, self.interval = metrics, keys, interval
        self.planned, self.max_steps, self.mode = planned, max_steps, mode
        self.rows: dict[str, dict[str, Any]] = {}
        self._printed = 0.0
        self._start = time.monotonic()
        self._base_steps = 0

    @property
    def _ranking(self) -> tuple[str, str | None]:
        """The metric trials are ranked by and the one that breaks its ties (if any)."""
        return self.metrics[0], (self.metrics[1:] or [None])[0]

    def setup(self, **info: Any) -> None:
        """At the start of every fit(), a resumed one too (its rows unpickled with it)."""
        self._start, self._base_steps = time.monotonic(), self._steps()

    def _steps(self) -> int:
        return sum(self.max_steps if r["state"] in ENDED else int(r.get("step") or 0)
                   for r in self.rows.values())

    def headline(self, now: float | None = None) -> str:
        """``2 finished, 2 running, 0 pending of 4 planned · best so far ... · elapsed 5m32s ·
        ETA ~4m10s``."""
        now = time.monotonic() if now is None else now
        states = [r["state"] for r in self.rows.values()]
        ended, running = sum(s in ENDED for s in states), states.count(RUNNING)
        planned = max(self.planned, len(states))
        parts = [f"{ended} finished, {running} running, {planned - ended - running} pending "
                 f"of {planned} planned"]
        metric, tie = self._ranking
        # each trial at its best reported step (the final table's rule), not its latest
        scored = {t: r.get("best") or r for t, r in self.rows.items()}
        scored = {t: r for t, r in scored.items() if r.get(metric) is not None}
        if scored:
            best = max(scored, key=lambda t: selection_key(scored[t], metric, self.mode, tie))
            at = scored[best].get("step")
            parts.append(f"best so far {best} {metric}={fmt(scored[best][metric])}"
                         + (f" (step {at})" if at is not None else ""))
        elapsed = now - self._start
        parts.append(f"elapsed {duration(elapsed)}")
        steps, total = self._steps(), planned * self.max_steps
        gained = steps - self._base_steps
        if gained > 0 and total > steps:
            parts.append(f"ETA ~{duration(elapsed * (total - steps) / gained)}")
        return " · ".join(parts)

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
        stream = sys.stdout  # looked up now: the callback is pickled with the Tuner
        print(f"\n[{time.strftime('%H:%M:%S')}] {self.headline(now)}", file=stream)
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
        latest = {k: result[k] for k in ("step", *self.metrics) if k in result}
        row.update(latest)
        metric, tie = self._ranking
        if result.get(metric) is not None and (row.get("best") is None or selection_key(
                latest, metric, self.mode, tie) > selection_key(row["best"], metric, self.mode,
                                                               tie)):
            row["best"] = latest
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
