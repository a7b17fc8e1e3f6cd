"""A normal run's terminal holds slotsweep's own lines, not library noise: `slotsweep train tiny`,
a quickstart sweep, `promote` and `rerun` (each in a fresh process, Ray's RAY_AUTH_MODE unset
as a new user has it) print none of the warnings a first run used to bury them under."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

NOISE = (
    "Token authentication is enabled",  # Ray 2.60, every local ray.init with the mode unset
    "RAY_AUTH_MODE=disabled",
    "smaller than the logging interval",  # Lightning, epochs shorter than log_every_n_steps
    "suggested max number of worker",  # PyTorch, more loader processes than CPUs
    "Successfully registered model",  # MLflow's register_model, on stderr
    "Created version",
    "CloudPickle",  # MLflow logging a pickled PythonModel
    "arbitrary code",
    "Add type hints",
    "Traceback",
    "UserWarning",
    "DeprecationWarning",
    "PossibleUserWarning",
)


def _run(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env["SLOTSWEEP_MLFLOW_DIR"] = str(tmp_path / "mlflow")
    done = subprocess.run([sys.executable, "-m", "dashboards.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _quiet(done: subprocess.CompletedProcess) -> None:
    found = [n for n in NOISE if n in done.stdout + done.stderr]
    assert not found, f"{found} in:\n{done.stderr[-3000:]}"


def test_training_prints_no_library_warning(tmp_path):
    _quiet(_run(tmp_path, "train", "tiny", "trainer.max_steps=30",
                f"dataset.num_workers={os.cpu_count() + 2}", "--log-dir", "logs"))


def test_a_sweep_its_promotion_and_a_rerun_print_no_library_warning(tmp_path):
    _quiet(_run(tmp_path, "sweep", "quickstart", "trials=2", "trainer.max_steps=4",
                "storage=sweeps", "--no-report"))
    promoted = _run(tmp_path, "promote", "sweeps/quickstart")
    _quiet(promoted)
    assert "registered quickstart version 1 as @champion" in promoted.stdout
    record = json.loads((tmp_path / "sweeps" / "quickstart" / "best.json").read_text())
    _quiet(_run(tmp_path, "rerun", record["best"]["mlflow_run_id"]))
