"""``slotsweep report SWEEP``: one self-contained HTML page (plotly's JavaScript inlined, masks
as embedded PNGs; works offline, from disk or as an MLflow artifact) that answers which values
of the searched parameters give the best val/ari and val/mbo, and whether the winning masks
follow objects. Written to ``<sweep dir>/report.html`` and logged to the sweep's parent run.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Any

import jinja2

from core.errors import SlotsweepError, one_line
from core.names import DOWNSTREAM_PREFIX, METRIC_ARI, METRIC_MBO, REPORT_HTML, downstream_metric
from core.text import Progress, fmt
from core.training.selection import selection_key
from dashboards import analysis, figures
from dashboards.data import SweepData, collect
from dashboards.masks import trial_masks
from orchestrator.mlflow_runs import run_link

STATE_WORDS = {"DONE": "done", "STOPPED": "stopped by ASHA", "DIVERGED": "diverged",
               "FAILED": "failed", "RUNNING": "running", "INTERRUPTED": "interrupted"}
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("dashboards", "templates"), autoescape=True,
    undefined=jinja2.StrictUndefined)


def _html(fig: Any) -> str | None:
    if fig is None:
        return None
    return fig.to_html(full_html=False, include_plotlyjs=False,
                       config={"displaylogo": False, "responsive": True})


def _ranked(data: SweepData) -> list[Any]:
    """Trials best first by the sweep's selection rule (tie-break included); unscored last."""
    def key(t: Any) -> tuple:
        score = t.metrics.get(data.metric)
        if score is None or math.isnan(score):
            return (1, 0.0, 0.0)
        best, tie = selection_key(t.metrics, data.metric, data.mode, data.tie_break)
        return (0, -best, -tie)

    return sorted(data.trials, key=key)


def _status(data: SweepData) -> str:
    ended = sum(t.state not in ("RUNNING", "INTERRUPTED") for t in data.trials)
    running = sum(t.state == "RUNNING" for t in data.trials)
    if data.complete:
        return f"complete: {ended} of {data.planned} trials"
    return (f"in progress or interrupted: {ended} ended, {running} running, "
            f"{max(0, data.planned - len(data.trials))} not started, of {data.planned} planned")


SHORT_TASKS = {"linear_probe": "probe", "4way_classification": "4-way", "few_shot": "few-shot"}


def column_title(metric: str) -> str:
    """A leaderboard header: ``val/mbo`` as it is, ``downstream/4way_classification/accuracy``
    as ``4-way accuracy`` (the full name is its tooltip and in the note under the table)."""
    parts = metric.split("/")
    if parts[0] != DOWNSTREAM_PREFIX or len(parts) < 3:
        return metric
    what = re.sub(r"(\d+)shot_", r"\1-shot ", "/".join(parts[2:]))
    return f"{SHORT_TASKS.get(parts[1], parts[1])} {what}"


def downstream_notes(data: SweepData) -> list[str]:
    """One line per downstream task under the leaderboard: where its column comes from and what
    the two baselines scored on the same trials' clips (what the slots add)."""
    notes = []
    for task, done in sorted(data.downstream.items()):
        key = done["headline"]
        trained = [t["metrics"].get(key) for t in done["trials"].values()]
        spans = []
        for name, what in (("untrained", "an untrained slot model"),
                           ("backbone", "the backbone's mean-pooled features")):
            values = [t["metrics"][f"{name}/{key}"] for t in done["trials"].values()
                      if f"{name}/{key}" in t["metrics"]]
            if values:
                spans.append(f"{what} {_span(values)}")
        notes.append(f"{downstream_metric(task, key)}: slotsweep evaluate-sweep {data.name} "
                     f"--task {task} (label {done['label']!r}, seed {done['seed']}) on each "
                     f"trial's best checkpoint: {_span([v for v in trained if v is not None])}; "
                     f"on the same clips {' and '.join(spans)}.")
    return notes


def _span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return fmt(low) if low == high else f"{fmt(low)} to {fmt(high)}"


def render(data: SweepData, top_k: int = 4, data_dir: str | None = None,
           masks: bool = True) -> str:
    """The page of ``data``; ``masks``: run the top ``top_k`` trials' models (and every trial's
    for the diagnostics) on the same validation clip."""
    ranked = _ranked(data)
    params = [{"key": k, "short": data.labels[k]} for k in data.search]
    others = [m for m in (METRIC_ARI, METRIC_MBO) if m != data.metric]
    others += sorted({m for t in data.trials for m in t.metrics
                      if m.startswith(DOWNSTREAM_PREFIX + "/")})
    shown, diagnostics, errors = [], [], []
    diag_by_trial: dict[str, dict[str, Any]] = {}
    if masks:
        with Progress("slot masks", len(ranked), "trials") as bar:
            for rank, t in enumerate(ranked):
                bar.update()
                try:
                    got = trial_masks(t, data_dir)
                except (SlotsweepError, OSError) as exc:
                    errors.append(f"masks of trial {t.trial_id}: {one_line(exc, 200)}")
                    continue
                if got is None:
                    continue
                d = diag_by_trial[t.trial_id] = got["diagnostics"]
                diagnostics.append({"trial_id": t.trial_id, "d": d,
                                    "areas": "  ".join(f"{a:.0%}" for a in d["area"])})
                if rank < top_k and t.metrics:
                    score = t.metrics.get(data.metric)
                    shown.append({"trial_id": t.trial_id, "png": got["png"],
                                  "caption": f"#{rank + 1} trial {t.trial_id} at step {t.step}: "
                                             f"{data.metric}={fmt(score)}; " + ", ".join(
                                      f"{data.labels[k]}={fmt(t.sampled.get(k))}"
                                      for k in data.search)})
    rows = []
    for rank, t in enumerate(ranked, start=1):
        d = diag_by_trial.get(t.trial_id)
        slots = "-" if d is None else f"{d['in_use']} / {d['slots']}" + (
            " (collapse)" if d["collapse"] else "")
        rows.append({
            "rank": rank, "t": t, "champion": t.trial_id == data.best_id,
            "vals": {k: fmt(t.sampled.get(k)) for k in data.search},
            "score": fmt(t.metrics.get(data.metric)),
            "others": {m: fmt(t.metrics.get(m)) for m in others},
            "state": STATE_WORDS.get(t.state, t.state.lower()), "slots": slots,
            "link": (run_link(data.ui_uri, data.experiment_id, t.run_id)
                     if data.ui_uri and data.experiment_id and t.run_id else None),
        })
    importance = analysis.param_importance(data)
    lineage = [{"trial_id": t.trial_id, "what": "registered", "detail": v}
               for t in ranked for v in t.versions]
    lineage += [{"trial_id": t.trial_id, "what": f"rerun {r['name'] or r['run_id'][:8]}",
                 "detail": ", ".join(f"{k} {r['diff'][k]:+.4f}" for k in r["diff"])
                 or r["status"].lower()}
                for t in ranked for r in t.reruns]
    return _TEMPLATES.get_template("report.html.j2").render(
        d=data, plotly_js=_plotly_js(), status=_status(data), rows=rows, params=params,
        others=others, titles={m: column_title(m) for m in others},
        built=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        warnings=analysis.coverage(data),
        effect_figures=[h for h in (
            _html(figures.effects(data)), _html(figures.parallel(data)),
            _html(figures.importance(importance, data.metric, data.labels))) if h],
        importance_note=None if importance else (
            "Parameter importance needs at least 3 trials with a value and a parameter that "
            "varied."),
        pareto=_html(figures.pareto(data)), curves=_html(figures.curves(data)),
        masks=shown, mask_errors=errors, diagnostics=diagnostics, lineage=lineage,
        downstream_notes=downstream_notes(data),
        ui_note=None if data.ui_uri else (
            "Run links need a reachable MLflow UI: `slotsweep ui` serves the embedded store."),
    )


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def build_report(sweep: str | Path, out: str | Path | None = None, top_k: int = 4,
                 tracking_uri: str | None = None, log: bool = True,
                 masks: bool = True) -> Path:
    """Write the report of ``sweep`` (a name, folder or best.json; finished or running) and,
    with ``log``, log it to the sweep's parent run; returns the file."""
    from orchestrator.mlflow_runs import client_for
    from orchestrator.mlflow_server import resolve_tracking_uri
    from orchestrator.registry import find_sweep_dir, open_store
    from orchestrator.spec import load_sweep
    from orchestrator.sweep import SPEC_YAML

    sweep_dir, record = find_sweep_dir(sweep)
    spec = load_sweep(sweep_dir / SPEC_YAML)
    uri, server = open_store(tracking_uri, record)
    try:
        client = client_for(uri)
        # links: the sweep's own server, or `slotsweep ui` for the embedded store
        embedded = resolve_tracking_uri(spec.mlflow.tracking_uri) is None
        ui = "http://127.0.0.1:5000" if embedded else uri
        data = collect(sweep_dir, client, ui_uri=ui, spec=spec)
        html = render(data, top_k=top_k, data_dir=spec.data_dir, masks=masks)
        path = Path(out) if out else sweep_dir / REPORT_HTML
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(html)
        tmp.replace(path)  # a browser reloading during a sweep never sees half a page
        if log and data.parent_run_id:
            client.log_artifact(data.parent_run_id, str(path))
        return path
    finally:
        if server is not None:
            server.stop()
