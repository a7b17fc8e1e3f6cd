"""Data loader throughput from disk: clips/s of the training and validation loaders.

Writes a generated dataset (JPEG frames, PNG masks) at the requested size into a temporary
directory, then iterates the real VideoDataModule loaders as training would (workers, pinned
memory when CUDA exists) and prints clips/s and frames/s.

    python bench/loader_bench.py [--size 224] [--frames 8] [--videos 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from core.data.config import DatasetConfig, resolve_paths
from core.data.datamodule import VideoDataModule
from core.data.synthetic import SyntheticSpec, write_synthetic_dataset


def _clips_per_second(loader, batches: int) -> float:
    """Clips/s over ``batches`` batches (as many epochs as that takes), after one warm-up batch."""
    next(iter(loader))  # pays for worker start-up (persistent workers stay up afterwards)
    clips, seen, start = 0, 0, time.perf_counter()
    while seen < batches:
        for batch in loader:
            clips += batch["video"].shape[0]
            seen += 1
            if seen >= batches:
                break
    return clips / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--frames", type=int, default=8, help="ep_length (frames per clip)")
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--video-frames", type=int, default=16, help="frames per stored video")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        spec = SyntheticSpec(n_frames=args.video_frames, size=args.size)
        write_synthetic_dataset(root, args.videos, spec, seed=0, val_fraction=0.5)
        print(f"wrote {args.videos} videos x {args.video_frames} frames at {args.size} px "
              f"in {time.perf_counter() - t0:.1f} s")
        cfg = DatasetConfig(
            img_size=args.size,
            ep_length=args.frames,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
        cfg = resolve_paths(cfg, root)
        dm = VideoDataModule(cfg, seed=0)
        dm.setup("fit")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, workers={args.workers}, batch={args.batch_size}, "
              f"T={args.frames}, {args.size}x{args.size}")
        print(f"{'loader':<22}{'clips/s':>10}{'frames/s':>10}")
        for name, make in (("train (frames)", dm.train_dataloader),
                           ("val (frames + masks)", dm.val_dataloader)):
            rate = _clips_per_second(make(), args.batches)
            print(f"{name:<22}{rate:>10.1f}{rate * args.frames:>10.0f}")


if __name__ == "__main__":
    main()
