"""The same 8-trial sweep with and without the feature cache, end to end, on this machine.

    python bench/sweep.py [--sweep bench/sweep_cache.yaml] [key=value ...]

Runs ``slotsweep sweep`` twice in fresh processes, each with its own empty cache and MLflow
folders, so the cached run pays for building its cache: once with ``feature_cache.mode=off``
(every trial runs the frozen backbone on every frame), once with the default ``auto`` (the
first trial builds the cache, the others wait for it and read it). Prints both wall-clock
times and their ratio, and checks that the cached trials really read the cache (their MLflow
tag) and the uncached did not. Extra ``key=value`` items go to both sweeps (e.g. ``trials=4``
or ``resources.gpus_per_trial=0.25`` on a GPU machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(sweep: str, extra: list[str], mode: str, tmp: Path) -> tuple[float, dict]:
    env = dict(os.environ, SLOTSWEEP_CACHE=str(tmp / f"cache-{mode}"),
               SLOTSWEEP_MLFLOW_DIR=str(tmp / f"mlflow-{mode}"))
    env.pop("RAY_ADDRESS", None)  # a local Ray for each run
    argv = [sys.executable, "-m", "orchestrator.cli", "sweep", sweep, f"storage={tmp / mode}",
            f"name=bench-{mode}", f"feature_cache.mode={mode}", *extra]
    # the generated data (same seed: the same frames for both runs) is made before the clock
    subprocess.run([sys.executable, "-c", _MAKE_DATA, sweep, *extra], env=env, cwd=ROOT,
                   check=True)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"the {mode} sweep failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    record = json.loads((tmp / mode / f"bench-{mode}" / "best.json").read_text())
    cache_lines = [line for line in done.stdout.splitlines() if line.startswith("feature cache")]
    return seconds, {"record": record, "cache": cache_lines, "mlflow": tmp / f"mlflow-{mode}"}


_MAKE_DATA = """
import sys
from core.config import load_config
from core.data.prepare import ensure_synthetic
from orchestrator.spec import load_sweep
spec = load_sweep(sys.argv[1], sys.argv[2:])
ensure_synthetic(load_config(spec.base, spec.overrides).dataset, spec.data_dir)
"""


def _tags(mlflow_dir: Path, experiment: str) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{mlflow_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r.data.tags.get("slotsweep.feature_cache", "?") for r in runs
            if r.data.tags.get("slotsweep.kind") == "trial"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(ROOT / "bench" / "sweep_cache.yaml"))
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results = {mode: run(args.sweep, extra, mode, tmp) for mode in ("off", "auto")}
        from orchestrator.spec import load_sweep

        experiment = load_sweep(args.sweep, extra).mlflow.experiment
        tags = {mode: _tags(info["mlflow"], experiment) for mode, (_, info) in results.items()}
    off_s = results["off"][0]
    on_s, on = results["auto"]
    n = len(on["record"]["trials"])
    assert all(t == "none" for t in tags["off"]), tags["off"]
    assert tags["auto"] and all(t not in ("none", "?") for t in tags["auto"]), tags["auto"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"sweep {Path(args.sweep).name} {' '.join(extra)}: {n} trials")
    print(f"{'':44}{'wall s':>8}{'s/trial':>9}")
    print(f"{'feature_cache.mode=off (backbone in the loop)':44}{off_s:>8.1f}{off_s / n:>9.1f}")
    print(f"{'feature_cache.mode=auto (built once, read)':44}{on_s:>8.1f}{on_s / n:>9.1f}")
    print(f"  {on['cache'][0] if on['cache'] else ''}")
    best = {m: r[1]["record"]["best"]["metrics"].get("val/ari") for m, r in results.items()}
    print(f"speed-up with the cache: {off_s / on_s:.2f}x  (best val/ari off {best['off']:.4f}, "
          f"cached {best['auto']:.4f})")


if __name__ == "__main__":
    main()
