"""How long `slotsweep evaluate` takes on a 1,000-clip features file: each task once, timed from
the loaded file to the numbers (what the command adds after loading).

    python bench/downstream.py [--clips 1000] [--features DIR]

Without ``--features`` the file is generated (tests/fake_features.py) at the published model's
sizes: 8 frames, 7 slots of 128 numbers, ViT-B/14's 768 backbone numbers, 3 objects per clip,
12 categories, 2 clips per video; with it, a real folder of ``slotsweep extract-features``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from core.downstream import TASKS
from core.downstream.evaluate import evaluate
from core.downstream.features import load_features

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "tests"))  # the generator the downstream tests use

from fake_features import made_features  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=1000)
    parser.add_argument("--features", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.features:
        features = load_features(args.features)
    else:
        features = made_features(videos=args.clips // 2, clips=2, classes=12, signal=0.5,
                                 frames=8, n_slots=7, slot_dim=128, backbone_dim=768)
    made = time.perf_counter() - start
    clips, objects = len(features["video_ids"]), len(features["object_rows"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{clips} clips, {objects} objects, slots {tuple(features['slots'].shape[1:])}, "
          f"backbone {features['backbone'].shape[1]}; file ready in {made:.1f} s")
    total = 0.0
    for task in TASKS:
        start = time.perf_counter()
        result = evaluate(features, task)
        took = time.perf_counter() - start
        total += took
        headline = {k: round(v, 3) for k, v in result["metrics"].items()
                    if k in ("accuracy", "5shot_accuracy", "backbone/accuracy")}
        print(f"{task:20s} {took:6.1f} s   {headline}")
    print(f"all three tasks: {total:.1f} s")


if __name__ == "__main__":
    main()
