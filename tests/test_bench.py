"""Smoke runs of the benchmarks CI can afford (no thresholds: figures go to bench/RESULTS.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_cpu_mode_prints_all_four_modes():
    done = subprocess.run(
        [sys.executable, "bench/throughput.py", "tiny", "--steps", "4", "--warmup", "2",
         "--videos", "16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        match = re.match(r"\((\w)\) (.+?)\s{2,}(\S+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)", line)
        if match:
            rows[match[1]] = match
    assert set(rows) == {"a", "b", "c", "d"}, done.stdout
    for mode, row in rows.items():
        assert float(row[5]) > 0 and float(row[6]) > 0 and int(row[7]) > 0, row[0]
        assert row[4] == ("yes" if mode in "cd" else "no"), row[0]  # compiled on the CPU too
    assert "(c) / (a):" in done.stdout


def test_report_bench_prints_its_timings():
    done = subprocess.run([sys.executable, "bench/report.py", "--trials", "5", "--runs", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"report of 5 trials: [\d.]+ s \([\d.]+ MB page\)", done.stdout), done.stdout


def test_downstream_bench_prints_each_tasks_time():
    done = subprocess.run([sys.executable, "bench/downstream.py", "--clips", "200"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for task in ("linear_probe", "4way_classification", "few_shot"):
        assert re.search(rf"^{task}\s+[\d.]+ s", done.stdout, re.M), done.stdout
    assert re.search(r"all three tasks: [\d.]+ s", done.stdout), done.stdout
