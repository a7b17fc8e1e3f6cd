"""Orchestration overhead per trial: a sweep of N tiny trials (Ray Tune + MLflow, embedded
server) against calling ``core.train.train`` N times in one process with the same configs.

    python bench/sweep_overhead.py [--trials 4] [--concurrency 1]

Both sides train the same N configs (sweeps/quickstart.yaml: 8 steps, validation every 4). The
sweep's time includes starting MLflow and Ray; the table also shows the time per trial.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from core.config import load_config
from core.train import train
from orchestrator.search import trial_overrides
from orchestrator.spec import load_sweep
from orchestrator.sweep import run_sweep, shutdown_ray

QUICKSTART = Path(__file__).resolve().parents[1] / "sweeps" / "quickstart.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["SLOTSWEEP_MLFLOW_DIR"] = str(Path(tmp) / "mlflow")
        os.environ["SLOTSWEEP_CACHE"] = str(Path(tmp) / "cache")
        overrides = [f"storage={tmp}/sweeps", "name=bench", f"trials={args.trials}",
                     f"concurrency={args.concurrency}"]
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            code = run_sweep(QUICKSTART, overrides, stream=quiet)
        sweep_s = time.perf_counter() - start
        shutdown_ray()
        assert code == 0, "the sweep failed"
        record = json.loads((Path(tmp) / "sweeps" / "bench" / "best.json").read_text())
        spec = load_sweep(QUICKSTART, overrides)

        start = time.perf_counter()
        for i, trial in enumerate(sorted(record["trials"], key=lambda t: t["index"])):
            cfg = load_config(spec.base, [*spec.overrides, *trial_overrides(spec, trial["sampled"]),
                                          f"seed={spec.seed + i}"])
            train(cfg, run_dir=Path(tmp) / "direct" / str(i), progress_bar=False)
        direct_s = time.perf_counter() - start

    n = args.trials
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {n} tiny trials "
          f"(8 steps each), sweep concurrency {args.concurrency}")
    print(f"{'':34}{'total s':>10}{'s/trial':>10}")
    print(f"{'core.train.train x N, one process':34}{direct_s:>10.1f}{direct_s / n:>10.1f}")
    print(f"{'slotsweep sweep (Ray Tune+MLflow)':34}{sweep_s:>10.1f}{sweep_s / n:>10.1f}")
    print(f"overhead per trial: {(sweep_s - direct_s) / n:.1f} s "
          f"(includes Ray and MLflow start-up: {sweep_s - direct_s:.1f} s in all)")


if __name__ == "__main__":
    main()
