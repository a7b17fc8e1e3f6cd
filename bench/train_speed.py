"""Training speed and learning of real `slotsweep train` runs: clips/s, peak memory, FG-ARI.

    # integrated_saycam's model (random backbone weights) on generated 224 px data, 200 steps (GPU)
    python bench/train_speed.py integrated_saycam --steps 200 model.encoder.backbone.weights=random
    # FG-ARI reached by the synthetic config after 10 minutes of training (GPU)
    python bench/train_speed.py synthetic --minutes 10
    # smoke test on a CPU
    python bench/train_speed.py tiny --steps 6

Clips/s counts optimizer steps after the first ``--warmup`` (compilation, cuDNN autotuning,
worker start-up) and excludes validation. Prints one table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from core.cli import parse_args
from core.config import load_config
from core.train import train


class SpeedMeter(pl.Callback):
    """Wall time of training steps (validation excluded) and an optional time budget."""

    def __init__(self, warmup: int, minutes: float | None) -> None:
        self.warmup, self.budget = warmup, minutes * 60 if minutes else None
        self.step_times: list[float] = []
        self.batch_sizes: list[int] = []
        self._t0 = 0.0
        self.start = time.perf_counter()
        self.val_history: list[tuple[int, float, float]] = []

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.step_times.append(time.perf_counter() - self._t0)
        self.batch_sizes.append(int(batch["video"].shape[0]))
        if self.budget and time.perf_counter() - self.start > self.budget:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        if "val/ari" in m:
            elapsed = time.perf_counter() - self.start
            self.val_history.append((trainer.global_step, elapsed, float(m["val/ari"])))

    def clips_per_second(self) -> float:
        times, sizes = self.step_times[self.warmup :], self.batch_sizes[self.warmup :]
        return sum(sizes) / sum(times) if times else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--data-size", type=int, default=None, help="generated frame size")
    parser.add_argument("--use-optimizations", action="store_true")
    parser.add_argument("--out", default="bench/out/train_speed.json")
    args = parse_args(parser, None)

    overrides = list(args.overrides)
    base = load_config(args.config, overrides)
    size = args.data_size or base.dataset.img_size
    if base.dataset.synthetic is None:  # integrated_saycam reads SAYCam: use generated videos
        overrides += [f"dataset.synthetic={{videos: 256, frames: {base.dataset.ep_length * 2}, "
                      f"size: {size}, seed: 0}}", "dataset.json_dir=null", "dataset.img_dir=null"]
    if args.minutes is None:
        overrides += [f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}"]
    if args.use_optimizations:
        overrides.append("trainer.use_optimizations=true")
    cfg = load_config(args.config, overrides)
    meter = SpeedMeter(min(args.warmup, max(0, cfg.trainer.max_steps - 2)), args.minutes)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        result = train(cfg, [meter], log_dir=tmp, progress_bar=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.machine()
    report = {
        "config": args.config, "overrides": args.overrides, "device": device,
        "torch": torch.__version__, "steps": result["global_step"],
        "batch": cfg.dataset.batch_size, "frames": cfg.dataset.ep_length,
        "img_size": cfg.dataset.img_size, "slots": cfg.globals.NUM_SLOTS,
        "clips_per_s": meter.clips_per_second(), "peak_gib": peak,
        "val_ari": result["metrics"].get("val/ari"), "val_mbo": result["metrics"].get("val/mbo"),
        "best_val_ari": result["best_score"], "val_history": meter.val_history,
        "minutes": (time.perf_counter() - meter.start) / 60,
    }
    print(f"device: {device}, torch {torch.__version__}")
    print(f"{args.config}: B={report['batch']} T={report['frames']} K={report['slots']} "
          f"{report['img_size']} px, {report['steps']} steps in {report['minutes']:.1f} min")
    print(f"  clips/s (after {meter.warmup} warm-up steps): {report['clips_per_s']:.1f}")
    if peak is not None:
        print(f"  peak GPU memory: {peak:.2f} GiB")
    for step, seconds, ari in meter.val_history:
        print(f"  step {step:>6} at {seconds / 60:5.1f} min: val/ari {ari:.4f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
