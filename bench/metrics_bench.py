"""Time core.metrics (FG-ARI, mBO) against per-video sklearn / numpy loops at validation size.

    python bench/metrics_bench.py [--videos 32 --frames 8 --size 224 --slots 7 --repeats 3]

Builds structured random data (ground truth: ~5 moving rectangles on background; prediction: the
truth mapped onto ``--slots`` ids with shifted boxes and pixel noise), checks that both paths
agree to 1e-6 and prints seconds per call (median of repeats) and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.metrics import fg_ari, mbo


def make_data(
    videos: int, frames: int, size: int, slots: int, objects: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth: moving rectangles on background 0; prediction: noisy copy on `slots` ids."""
    rng = np.random.default_rng(seed)
    true = np.zeros((videos, frames, size, size), dtype=np.int64)
    pred = np.zeros_like(true)
    for v in range(videos):
        slot_of = rng.permutation(slots)  # object id -> slot id; slot_of[0] is the background slot
        pred[v] = slot_of[0]
        for obj in range(1, objects + 1):
            h, w = rng.integers(size // 8, size // 2, size=2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            vy, vx = rng.integers(-3, 4, size=2)
            for f in range(frames):
                y0 = int(np.clip(y + vy * f, 0, size - h))
                x0 = int(np.clip(x + vx * f, 0, size - w))
                true[v, f, y0 : y0 + h, x0 : x0 + w] = obj
                dy, dx = rng.integers(-4, 5, size=2)  # prediction boxes are a bit off
                py, px = int(np.clip(y0 + dy, 0, size - h)), int(np.clip(x0 + dx, 0, size - w))
                pred[v, f, py : py + h, px : px + w] = slot_of[obj % slots]
    noise = rng.random(pred.shape) < 0.05
    pred[noise] = rng.integers(0, slots, size=int(noise.sum()))
    return torch.from_numpy(pred), torch.from_numpy(true)


def sklearn_ari(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    out = []
    for p, t in zip(pred, true, strict=True):
        fg = t != 0
        out.append(adjusted_rand_score(t[fg], p[fg]))
    return np.array(out)


def numpy_mbo(pred: np.ndarray, true: np.ndarray, matching: str) -> np.ndarray:
    out = []
    for p, t in zip(pred, true, strict=True):
        objects = [c for c in np.unique(t) if c != 0]
        segments = np.unique(p)
        if not objects:
            out.append(np.nan)
            continue
        iou = np.zeros((len(objects), len(segments)))
        for i, c in enumerate(objects):
            tm = t == c
            for j, k in enumerate(segments):
                pm = p == k
                union = np.logical_or(tm, pm).sum()
                iou[i, j] = np.logical_and(tm, pm).sum() / union if union else 0.0
        if matching == "overlap":
            out.append(iou.max(axis=1).mean())
        else:
            rows, cols = linear_sum_assignment(iou, maximize=True)
            out.append(iou[rows, cols].sum() / len(objects))
    return np.array(out)


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--slots", type=int, default=7)
    parser.add_argument("--objects", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="device for core.metrics (cpu, cuda)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"cpu: {platform.processor() or platform.machine()}, os.cpu_count() = {os.cpu_count()}")
    shape = f"{args.videos} videos x {args.frames} frames x {args.size}x{args.size}"
    print(f"data: {shape}, {args.objects} objects, {args.slots} slot ids, {args.repeats} repeats")

    pred, true = make_data(args.videos, args.frames, args.size, args.slots, args.objects, args.seed)
    pred_np, true_np = pred.numpy(), true.numpy()
    pred_d, true_d = pred.to(args.device), true.to(args.device)

    cases = [
        ("fg_ari", lambda: fg_ari(pred_d, true_d), lambda: sklearn_ari(pred_np, true_np)),
    ]
    for matching in ("overlap", "hungarian"):
        cases.append(
            (
                f"mbo[{matching}]",
                lambda m=matching: mbo(pred_d, true_d, m),
                lambda m=matching: numpy_mbo(pred_np, true_np, m),
            )
        )

    rows = []
    for name, ours, reference in cases:
        ours()  # warm-up
        t_ours, got = timed(ours, args.repeats)
        t_ref, expected = timed(reference, args.repeats)
        diff = float(np.nanmax(np.abs(got.cpu().numpy() - expected)))
        if diff > 1e-6:
            raise SystemExit(f"{name}: core.metrics and reference differ by {diff:.3g}")
        ref_name = "sklearn loop" if name == "fg_ari" else "numpy loop"
        rows.append((f"core.metrics.{name}", t_ours, t_ref / t_ours, diff))
        rows.append((f"{ref_name} {name}", t_ref, 1.0, None))
        print(f"  {name}: mean {float(got.nanmean()):.4f}, max |diff| {diff:.1e}")

    print(f"\n{'method':<32} {'s/call':>10} {'speed-up':>9}")
    for name, seconds, speedup, _ in rows:
        print(f"{name:<32} {seconds:>10.4f} {speedup:>8.1f}x")


if __name__ == "__main__":
    main()
