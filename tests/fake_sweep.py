"""A sweep written as slotsweep writes one, without training: its folder (sweep.yaml, trial
folders, best.json) and its MLflow runs with val/ari and val/mbo histories. For report tests
and bench/report.py (100 trials in seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from core.names import BEST_JSON, METRIC_ARI, METRIC_MBO, TAG_KIND, TAG_PARENT, TAG_TRIAL
from orchestrator import spec as specs
from orchestrator.trial import DONE_JSON, RUN_DIRNAME, TRIAL_JSON

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"
STATES = ("DONE", "DONE", "DONE", "STOPPED", "FAILED")  # drawn per trial


def make_fake_sweep(storage: Path, uri: str, trials: int, name: str = "fake", seed: int = 0,
                    running: int = 0, complete: bool = True) -> Path:
    """A sweep of ``trials`` trials under ``storage/name``, logged to the server at ``uri``:
    done, stopped-by-the-scheduler and failed trials, the last ``running`` ones still running
    (no best.json when ``complete`` is False). Returns the sweep's folder."""
    rng = random.Random(seed)
    spec = specs.load_sweep(QUICKSTART, [f"name={name}", f"trials={trials}",
                                         f"mlflow.experiment={name}"])
    sweep_dir = storage / name
    (sweep_dir / RUN_DIRNAME).mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text(specs.to_yaml(spec))
    client = MlflowClient(uri)
    experiment = client.create_experiment(name)
    parent = client.create_run(experiment, run_name=name, tags={TAG_KIND: "sweep"}).info.run_id
    listed: list[dict[str, Any]] = []
    for i in range(trials):
        trial_id = f"fake0_{i:05d}"
        state = "RUNNING" if i >= trials - running else rng.choice(STATES)
        sampled = {"globals.NUM_SLOTS": rng.choice([3, 4]),
                   "model.losses.loss_ss.temperature": round(10 ** rng.uniform(-1.3, -0.3), 5),
                   "model.loss_weights.loss_ss": round(rng.uniform(0.1, 1.0), 4)}
        run = client.create_run(experiment, run_name=f"{name}-{i:03d}",
                                tags={TAG_KIND: "trial", TAG_PARENT: parent, TAG_TRIAL: trial_id})
        run_id = run.info.run_id
        steps = {"STOPPED": [4], "FAILED": [4], "RUNNING": [4]}.get(state, [4, 8, 12])
        skill = rng.uniform(0.0, 0.5) + 0.1 * (sampled["globals.NUM_SLOTS"] == 4)
        history = {s: {METRIC_ARI: skill * s / 12 + rng.uniform(-0.02, 0.02),
                       METRIC_MBO: 0.1 + skill * s / 20 + rng.uniform(-0.02, 0.02)}
                   for s in steps}
        client.log_batch(run_id, metrics=[Metric(k, v, 0, s) for s, m in history.items()
                                          for k, v in m.items()])
        client.set_terminated(run_id, {"DONE": "FINISHED", "STOPPED": "KILLED",
                                       "FAILED": "FAILED"}.get(state, "RUNNING"))
        run_dir = sweep_dir / RUN_DIRNAME / trial_id
        run_dir.mkdir()
        (run_dir / TRIAL_JSON).write_text(json.dumps(
            {"trial_id": trial_id, "index": i, "sampled": sampled, "mlflow_run_id": run_id,
             "seed": i}))
        if state == "DONE":
            (run_dir / DONE_JSON).write_text(json.dumps({"step": 12}))
        best = max(history, key=lambda s: (history[s][METRIC_ARI], history[s][METRIC_MBO]))
        listed.append({"trial_id": trial_id, "index": i, "state": state, "sampled": sampled,
                       "step": best, "metrics": history[best], "checkpoint": None,
                       "mlflow_run_id": run_id, "run_dir": str(run_dir),
                       "error": "RuntimeError: injected" if state == "FAILED" else None})
    if complete:
        scored = [t for t in listed if t["state"] != "RUNNING"]
        best_trial = max(scored, key=lambda t: (t["metrics"][METRIC_ARI], t["metrics"][METRIC_MBO]))
        (sweep_dir / BEST_JSON).write_text(json.dumps({
            "sweep": name, "complete": True, "trials_planned": trials, "trials_ended": trials,
            "select": {"metric": METRIC_ARI, "mode": "max", "tie_break": METRIC_MBO},
            "best": best_trial, "trials": listed,
            "mlflow": {"tracking_uri": uri, "experiment": name, "experiment_id": experiment,
                       "parent_run_id": parent, "embedded_store": None}}))
    return sweep_dir
