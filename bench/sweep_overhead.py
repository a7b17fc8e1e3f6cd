"""Orchestration overhead per trial: a sweep of N tiny trials (Ray Tune + MLflow, embedded
server) against calling ``core.train.train`` N times in one process with the same configs.

    python bench/sweep_overhead.py [--trials 4] [--concurrency 1]
    python bench/sweep_overhead.py --startup [--runs 3] [--standing | --warm]

Both sides train the same N configs (sweeps/quickstart.yaml: 8 steps, validation every 4). The
sweep's time includes starting MLflow and Ray; the table also shows the time per trial.

``--startup`` times what a user waits for, each as its own `slotsweep sweep` process: a sweep file
with a bad value until its one-line error, and a one-trial quickstart from the command to its
trial's first training step (the timestamp of `train/loss` at step 1 in MLflow, written by the
trial process as the step ends). The first run makes the data and the feature cache; the others
find them. ``--standing``: a `ray start` cluster and an MLflow server run already; ``--warm``: the
warm server of `slotsweep up` runs (each sweep waits until the server has restarted Ray after
the one before, as a user typing the next command would).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.config import load_config
from core.tools import cache_features
from core.train import train
from orchestrator.search import trial_overrides
from orchestrator.spec import load_sweep
from orchestrator.sweep import run_sweep, shutdown_ray

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--startup", action="store_true",
                        help="time start-up instead: a bad file's error, the first trial step")
    parser.add_argument("--runs", type=int, default=3, help="--startup: sweeps to time")
    parser.add_argument("--standing", action="store_true",
                        help="--startup: with a `ray start` cluster and an MLflow server "
                             "already running (RAY_ADDRESS=auto, mlflow.tracking_uri)")
    parser.add_argument("--warm", action="store_true",
                        help="--startup: with the warm server of `slotsweep up` running")
    parser.add_argument("--settle", type=float, default=10.0,
                        help="--warm: seconds between the server's Ray restart after a sweep "
                             "and the next sweep (0: at once, as a script would)")
    args = parser.parse_args()
    if args.startup:
        startup(args.runs, args.standing, args.warm, args.settle)
        return

    n = args.trials
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SLOTSWEEP_MLFLOW_DIR"] = str(Path(tmp) / "mlflow")
        os.environ["SLOTSWEEP_CACHE"] = str(Path(tmp) / "cache")
        base = load_sweep(QUICKSTART, [])
        cache_features(load_config(base.base, base.overrides), base.data_dir)  # both sweeps find it
        one_s, _ = _sweep(tmp, "one", 1, args.concurrency)  # start-up and one trial
        sweep_s, overrides = _sweep(tmp, "bench", n, args.concurrency)
        record = json.loads((Path(tmp) / "sweeps" / "bench" / "best.json").read_text())
        spec = load_sweep(QUICKSTART, overrides)

        start = time.perf_counter()
        for i, trial in enumerate(sorted(record["trials"], key=lambda t: t["index"])):
            cfg = load_config(spec.base, [*spec.overrides, *trial_overrides(spec, trial["sampled"]),
                                          f"seed={spec.seed + i}"])
            train(cfg, run_dir=Path(tmp) / "direct" / str(i), progress_bar=False)
        direct_s = time.perf_counter() - start

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {n} tiny trials "
          f"(8 steps each), sweep concurrency {args.concurrency}")
    print(f"{'':34}{'total s':>10}{'s/trial':>10}")
    print(f"{'core.train.train x N, one process':34}{direct_s:>10.1f}{direct_s / n:>10.1f}")
    print(f"{'slotsweep sweep (Ray Tune+MLflow)':34}{sweep_s:>10.1f}{sweep_s / n:>10.1f}")
    print(f"{'slotsweep sweep of 1 trial':34}{one_s:>10.1f}")
    print(f"overhead per trial: {(sweep_s - direct_s) / n:.1f} s "
          f"(includes Ray and MLflow start-up: {sweep_s - direct_s:.1f} s in all)")
    if n > 1:  # what each further trial costs beyond its own training, start-up excluded
        added = (sweep_s - one_s) / (n - 1) - direct_s / n
        print(f"added per further trial (beyond its training): {added:.2f} s")


def _sweep(tmp: str, name: str, trials: int, concurrency: int) -> tuple[float, list[str]]:
    overrides = [f"storage={tmp}/sweeps", f"name={name}", f"trials={trials}",
                 f"concurrency={concurrency}"]
    start = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        code = run_sweep(QUICKSTART, overrides, stream=quiet)
    seconds = time.perf_counter() - start
    shutdown_ray()
    assert code == 0, "the sweep failed"
    return seconds, overrides


def startup(runs: int, standing: bool = False, warm: bool = False, settle: float = 10.0) -> None:
    from mlflow import MlflowClient

    from orchestrator.mlflow_server import LocalServer

    slotsweep = [sys.executable, "-m", "dashboards.cli"]  # the `slotsweep` command
    sweep = [*slotsweep, "sweep", str(QUICKSTART)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        env = {**os.environ, "SLOTSWEEP_MLFLOW_DIR": f"{tmp}/mlflow",
               "SLOTSWEEP_CACHE": f"{tmp}/cache", "SLOTSWEEP_WARM_DIR": f"{tmp}/warm"}
        env.pop("MLFLOW_TRACKING_URI", None)
        extra: list[str] = []
        server = None
        if warm:
            start = time.time()
            subprocess.run([*slotsweep, "up"], env=env, check=True, capture_output=True)
            print(f"slotsweep up: ready in {time.time() - start:.1f} s")
            stack.callback(subprocess.run, [*slotsweep, "down"], env=env, capture_output=True)
        if standing:  # what a team's machine has running already: `ray start` and a server
            server = stack.enter_context(LocalServer.start(Path(tmp) / "mlflow"))
            ray_cli = str(Path(sys.executable).parent / "ray")
            subprocess.run([ray_cli, "start", "--head", f"--num-cpus={os.cpu_count()}",
                            "--include-dashboard=false", "--disable-usage-stats"],
                           check=True, capture_output=True)
            stack.callback(subprocess.run, [ray_cli, "stop", "--force"], capture_output=True)
            env["RAY_ADDRESS"] = "auto"
            extra = [f"mlflow.tracking_uri={server.uri}"]
        start = time.time()
        bad = subprocess.run([*sweep, "trials=0"], env=env, capture_output=True, text=True)
        error_s = time.time() - start
        assert bad.returncode == 2, bad.stderr
        starts = []
        for i in range(runs):
            start = time.time()
            subprocess.run([*sweep, f"name=s{i}", f"storage={tmp}/sweeps", "trials=1",
                            "trainer.max_steps=4", *extra], env=env, check=True,
                           capture_output=True)
            starts.append(start)
            if warm:
                _wait_for_fresh_ray(Path(tmp) / "warm" / "server.log", i + 1, settle)
        if server is None:
            server = stack.enter_context(LocalServer.start(Path(tmp) / "mlflow"))
        client = MlflowClient(server.uri)
        first, phases = [], []
        for i, start in enumerate(starts):
            record = json.loads((Path(tmp) / "sweeps" / f"s{i}" / "best.json").read_text())
            run = record["trials"][0]["mlflow_run_id"]
            step1 = [m for m in client.get_metric_history(run, "train/loss") if m.step == 1]
            first.append(step1[0].timestamp / 1000 - start)
            # where the wait goes: the sweep's parent run is created once Ray and MLflow are
            # up; the trial's run once its process has imported torch and Lightning
            parent = client.get_run(record["mlflow"]["parent_run_id"]).info.start_time / 1000
            trial = client.get_run(run).info.start_time / 1000
            phases.append((parent - start, trial - parent, first[-1] - (trial - start)))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores"
          + ("; Ray and MLflow already running" if standing else "")
          + (f"; the warm server of `slotsweep up` running (each sweep {settle:g} s after its "
             f"Ray restart)" if warm else ""))
    print(f"bad sweep file -> its one-line error: {error_s:.1f} s")
    print(f"command -> first trial step, first run (makes data and cache): {first[0]:.1f} s")
    if runs > 1:
        print("command -> first trial step, later runs: "
              + ", ".join(f"{x:.1f}" for x in first[1:]) + " s")
    print("phases per run: command -> Ray and MLflow up / -> trial process in its run / "
          "-> first step")
    for i, (up, trial, step) in enumerate(phases):
        print(f"  run {i}: {up:.1f} s / {trial:.1f} s / {step:.1f} s")


def _wait_for_fresh_ray(log: Path, sweeps: int, settle: float, timeout: float = 60) -> None:
    """Until the warm server's log says Ray is ready again after its ``sweeps``-th sweep, then
    ``settle`` seconds more: its idle workers import torch and Lightning after Ray answers."""
    deadline = time.time() + timeout
    while log.read_text().count("ray: ready") < sweeps + 1 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(settle)


if __name__ == "__main__":
    main()
