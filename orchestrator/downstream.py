"""``slotsweep evaluate-sweep SWEEP --task TASK``: a downstream task (core/downstream) on the best
checkpoint of every finished trial of a sweep, so the sweep can be ranked and promoted by it.

For each trial: the checkpoint's features (both splits) are extracted once into
``<trial>/downstream/features/`` (reused by the next task while the checkpoint is the same), the
task runs, its numbers go to ``<trial>/downstream/<task>.json`` and to the trial's MLflow run as
``downstream/<task>/<metric>`` at the checkpoint's step (so ``slotsweep promote SWEEP --metric
downstream/linear_probe/accuracy`` finds that step's checkpoint), and ``<sweep>/downstream.json``
collects every trial's for the sweep report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from core.data.layout import write_json
from core.downstream.cli import add_task_arguments, parse_shots
from core.errors import SlotsweepError
from core.names import DOWNSTREAM_JSON, downstream_metric
from core.text import fmt, format_table

DOWNSTREAM_DIRNAME = "downstream"
# the number each task is ranked by (its other numbers are logged too)
HEADLINE = {"linear_probe": "accuracy", "4way_classification": "accuracy",
            "few_shot": "5shot_accuracy"}


def headline(task: str, shots: tuple[int, ...] = (1, 5)) -> str:
    """The metric a task is ranked by: ``accuracy``, or few_shot's largest k."""
    return HEADLINE[task] if task != "few_shot" else f"{max(shots)}shot_accuracy"


def _trial_features(trial: dict[str, Any]) -> dict[str, Any]:
    from core.downstream.cli import features_of
    from core.downstream.features import load_features

    folder = Path(trial["run_dir"]) / DOWNSTREAM_DIRNAME / "features"
    if folder.is_dir():
        try:
            features = load_features(folder)
            if features["checkpoint"] == trial["checkpoint"]:
                return features
        except SlotsweepError:
            pass  # from an older checkpoint or an interrupted extraction: extract again
        for old in folder.glob("*.pt"):
            old.unlink()
    return features_of(trial["checkpoint"], output_dir=folder)


def evaluate_sweep(sweep: str | Path, task: str, label: str = "label", seed: int = 0,
                   episodes: int = 1000, shots: tuple[int, ...] = (1, 5),
                   tracking_uri: str | None = None) -> dict[str, Any]:
    """Run ``task`` on every finished trial's best checkpoint; log and write its numbers."""
    from mlflow.entities import Metric

    from core.downstream.evaluate import evaluate
    from core.training.checkpoint import read_checkpoint
    from orchestrator.mlflow_runs import client_for
    from orchestrator.registry import find_sweep, open_store

    best_json, record = find_sweep(sweep)
    trials = [t for t in record["trials"] if t["state"] in ("DONE", "STOPPED")
              and t.get("checkpoint") and Path(t["checkpoint"]).is_file()]
    if not trials:
        raise SlotsweepError(f"sweep {record['sweep']} has no finished trial with a checkpoint")
    for trial in trials:  # a corrupt checkpoint is one line before any work starts
        read_checkpoint(trial["checkpoint"])
    uri, server = open_store(tracking_uri, record)
    results: dict[str, Any] = {}
    try:
        client = client_for(uri)
        for i, trial in enumerate(trials, 1):
            print(f"[{i}/{len(trials)}] trial {trial['trial_id']} (step {trial['step']})",
                  flush=True)
            result = evaluate(_trial_features(trial), task, label, seed, episodes, shots)
            out = Path(trial["run_dir"]) / DOWNSTREAM_DIRNAME / f"{task}.json"
            out.write_text(json.dumps({**result, "checkpoint": trial["checkpoint"],
                                       "step": trial["step"]}, indent=1, default=str))
            metrics = {downstream_metric(task, k): float(v) for k, v in result["metrics"].items()}
            if trial.get("mlflow_run_id"):
                client.log_batch(trial["mlflow_run_id"], metrics=[
                    Metric(k, v, int(time.time() * 1000), int(trial["step"] or 0))
                    for k, v in metrics.items()])
            results[trial["trial_id"]] = {"step": trial["step"], "metrics": result["metrics"]}
    finally:
        if server is not None:
            server.stop()
    summary_path = best_json.parent / DOWNSTREAM_JSON
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary[task] = {"label": label, "seed": seed, "headline": headline(task, shots),
                     "trials": results}
    write_json(summary_path, summary)  # atomic: a report built meanwhile reads all or nothing
    return {"task": task, "trials": results, "record": record, "path": summary_path,
            "headline": headline(task, shots)}


def summary_table(out: dict[str, Any]) -> str:
    """Trials by the task's headline number, with the two baselines' beside it."""
    task, key = out["task"], out["headline"]
    select = out["record"]["select"]["metric"]
    by_id = {t["trial_id"]: t for t in out["record"]["trials"]}
    ranked = sorted(out["trials"].items(), key=lambda kv: -kv[1]["metrics"][key])
    rows = []
    for trial_id, entry in ranked:
        m, selected = entry["metrics"], (by_id[trial_id].get("metrics") or {}).get(select)
        rows.append([trial_id, str(entry["step"]), fmt(selected), fmt(m[key]),
                     fmt(m.get(f"untrained/{key}")), fmt(m.get(f"backbone/{key}"))])
    return format_table(["trial", "step", select, f"{task} {key}", "untrained", "backbone"], rows)




def _evaluate_sweep(args: argparse.Namespace) -> int:
    out = evaluate_sweep(args.sweep, args.task, args.label, args.seed, args.episodes,
                         parse_shots(args.shots), args.tracking_uri)
    key = downstream_metric(args.task, out["headline"])
    print(f"\n{args.task} of {len(out['trials'])} trials' best checkpoints (label "
          f"{args.label!r}, seed {args.seed}), best first; logged to each trial's MLflow run as "
          f"{downstream_metric(args.task, '<metric>')}")
    print(summary_table(out))
    print(f"written: {out['path']}\npromote by it: slotsweep promote {args.sweep} --metric {key}")
    return 0


def add_evaluate_sweep(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate-sweep", help="a downstream task on every finished trial's best checkpoint",
        description="Rank a sweep's trials by what their slots are good for: the numbers go to "
        "each trial's MLflow run (downstream/<task>/<metric>), SWEEP/downstream.json and the "
        "sweep report.")
    ev.add_argument("sweep", help="sweep name (runs/sweeps/NAME), folder or best.json")
    add_task_arguments(ev)
    ev.add_argument("--tracking-uri", default=None)
    ev.set_defaults(func=_evaluate_sweep)
