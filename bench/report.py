"""How long `slotsweep report` takes on a large sweep: N generated trials (their folders and
MLflow runs, as tests/fake_sweep.py writes them; no training, so no masks) on a local MLflow
server, timing the page's build from the sweep's folder and the server.

    python bench/report.py [--trials 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from dashboards.report import build_report
from orchestrator.mlflow_server import LocalServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # the generator the report tests use; after the packages
# above are imported, so tests/orchestrator cannot shadow them

from fake_sweep import make_fake_sweep  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalServer.start(Path(tmp) / "mlflow") as server:
        start = time.perf_counter()
        sweep = make_fake_sweep(Path(tmp) / "sweeps", server.uri, args.trials)
        made = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            path = build_report(sweep, tracking_uri=server.uri, masks=False)
            times.append(time.perf_counter() - start)
        size = path.stat().st_size
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores")
    print(f"generated {args.trials} trials in {made:.1f} s")
    print(f"report of {args.trials} trials: " + ", ".join(f"{t:.2f}" for t in times)
          + f" s ({size / 1e6:.1f} MB page)")


if __name__ == "__main__":
    main()
