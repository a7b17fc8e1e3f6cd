"""Training throughput (clips/s) and peak memory of four ways to run the same training step.

    python bench/throughput.py tiny                       # CPU smoke mode (CI runs it)
    python bench/throughput.py integrated_saycam --gpu    # integrated_saycam's defaults on one GPU

  (a) ViT in the loop, plain       the recipe's step as configured (precision from the config)
  (b) cached features, plain       frames replaced by rows of the feature cache
  (c) cached features, optimized   + --use-optimizations (TF32, bf16, compiled step, CUDA graphs)
  (d) ViT in the loop, optimized   --use-optimizations with the backbone in the step

Each mode runs in its own process through a real Lightning Trainer and the real SlotModule
(gradient clipping, fused AdamW, schedule, logging), ``--steps`` steps of which the first
``--warmup`` (compilation, CUDA-graph capture, allocator warm-up) are not timed. Data is generated
(``dataset.synthetic`` at the config's image size). Modes (a)/(d) cycle a pool of real batches
already on the device, so JPEG decoding (bench/loader_bench.py) is not what is measured; modes
(b)/(c) read batches from the real cached loader (on the GPU when the split fits). ``--gpu`` sets
a random-weight backbone (no download) and prints the issue's targets beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "a": ("ViT in the loop, plain", False, False),
    "b": ("cached features, plain", True, False),
    "c": ("cached features, optimized", True, True),
    "d": ("ViT in the loop, optimized", False, True),
}
TARGETS = {"c": 1500.0, "d": 550.0}  # clips/s on one H100 at integrated_saycam's defaults
RESULT = "RESULT "


class _Cycle:
    """An endless iterable over a few batches already on the device."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        i = 0
        while True:
            yield self.batches[i % len(self.batches)]
            i += 1


def _to(batch: dict, device) -> dict:
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_mode(config: str, overrides: list[str], mode: str, steps: int, warmup: int,
             pool: int) -> dict:
    """One mode in this process; returns its figures."""
    import pytorch_lightning as pl
    import torch

    from core.config import load_config
    from core.train import feature_cache_for, make_datamodule
    from core.training.fast import FiniteGuard
    from core.training.module import SlotModule
    from core.training.trainer import lightning_precision, quiet_lightning

    _, cached, optimized = MODES[mode]
    cfg = load_config(config, [
        *overrides, f"trainer.use_optimizations={str(optimized).lower()}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "feature_cache.mode=" + ("build" if cached else "off"),
    ])
    quiet_lightning()
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if optimized and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(cfg.seed, verbose=False)
    cfg, dm = make_datamodule(cfg, None)
    module = SlotModule(cfg)
    if cached:
        cache = feature_cache_for(cfg, module.model.encoder, dm, say=False,
                                  log=lambda msg: None)
        dm.use_features(cache, cfg.feature_cache.gpu)
        loader = dm.train_dataloader()
    else:
        it = iter(dm.train_dataloader())
        batches = []
        for _ in range(pool):
            try:
                batches.append(_to(next(it), device))
            except StopIteration:
                it = iter(dm.train_dataloader())
                batches.append(_to(next(it), device))
        loader = _Cycle(batches)
    batch_size = cfg.dataset.batch_size
    times: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == warmup:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                times["start"] = time.perf_counter()

        def on_train_end(self, trainer, pl_module) -> None:
            if cuda:
                torch.cuda.synchronize()
            times["end"] = time.perf_counter()

    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, precision=lightning_precision(cfg),
        max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, gradient_clip_val=cfg.trainer.gradient_clip_val or None,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        callbacks=[FiniteGuard(), Clock()],
    )
    trainer.fit(module, train_dataloaders=loader)
    seconds = times["end"] - times["start"]
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    fast = module.fast_step
    return {
        "mode": mode, "what": MODES[mode][0],
        "clips_per_s": (steps - warmup) * batch_size / seconds,
        "step_ms": 1000 * seconds / (steps - warmup), "peak_bytes": peak,
        "peak_kind": "GPU allocated" if cuda else "process RSS",
        "precision": lightning_precision(cfg), "compiled": bool(fast and fast.compiled),
        "cuda_graphs": bool(fast and fast.cuda_graphs), "batch_size": batch_size,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a shipped config name or a YAML path (tiny on a CPU)")
    parser.add_argument("overrides", nargs="*", help="key=value for every mode")
    parser.add_argument("--modes", default="abcd")
    parser.add_argument("--steps", type=int, default=None, help="default 30 (CPU), 200 (--gpu)")
    parser.add_argument("--warmup", type=int, default=None, help="default 10 (CPU), 50 (--gpu)")
    parser.add_argument("--pool", type=int, default=4, help="frame batches cycled in (a)/(d)")
    parser.add_argument("--videos", type=int, default=None,
                        help="generated videos (default 64; 256 with --gpu, so that an epoch, "
                        "one clip per video, spans many steps)")
    parser.add_argument("--gpu", action="store_true",
                        help="random-weight backbone, issue targets printed")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    steps = args.steps or (200 if args.gpu else 30)
    videos = args.videos or (256 if args.gpu else 64)
    warmup = args.warmup if args.warmup is not None else (50 if args.gpu else 10)
    overrides = list(args.overrides)
    if args.gpu:
        overrides.insert(0, "model.encoder.backbone.weights=random")
    if args.only:
        print(RESULT + json.dumps(run_mode(args.config, overrides, args.only, steps, warmup,
                                           args.pool)), flush=True)
        return

    from core.config import load_config

    cfg = load_config(args.config, overrides)
    frames = max(cfg.dataset.ep_length, 8)
    data = [f"dataset.synthetic.videos={videos}", f"dataset.synthetic.frames={frames}",
            f"dataset.synthetic.size={cfg.dataset.img_size}", "dataset.synthetic.val_fraction=0.1"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SLOTSWEEP_CACHE=tmp)
        for mode in args.modes:
            argv = [sys.executable, str(Path(__file__).resolve()), args.config, *overrides, *data,
                    f"--only={mode}", f"--steps={steps}", f"--warmup={warmup}",
                    f"--pool={args.pool}"]
            done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            lines = [x for x in done.stdout.splitlines() if x.startswith(RESULT)]
            if done.returncode != 0 or not lines:
                tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
                sys.exit(f"mode {mode} failed:\n" + "\n".join(tail))
            rows.append(json.loads(lines[-1].removeprefix(RESULT)))
    g = cfg.globals
    print(f"device: {rows[0]['device']} ({os.cpu_count()} host cores); config {args.config}: "
          f"B={cfg.dataset.batch_size} T={cfg.dataset.ep_length} K={g.NUM_SLOTS} "
          f"{cfg.dataset.img_size} px; {steps - warmup} timed steps after {warmup}")
    print(f"{'mode':32}{'precision':>12}{'compiled':>10}{'clips/s':>10}{'ms/step':>9}"
          f"{'peak MiB':>10}")
    for r in rows:
        compiled = "graphs" if r["cuda_graphs"] else ("yes" if r["compiled"] else "no")
        target = f"   (target >= {TARGETS[r['mode']]:,.0f})" if args.gpu and r["mode"] in TARGETS \
            else ""
        print(f"({r['mode']}) {r['what']:28}{r['precision']:>12}{compiled:>10}"
              f"{r['clips_per_s']:>10.1f}{r['step_ms']:>9.1f}{r['peak_bytes'] / 2**20:>10.0f}"
              f"{target}")
    print(f"peak memory: {rows[0]['peak_kind']}")
    by = {r["mode"]: r["clips_per_s"] for r in rows}
    if "a" in by and "c" in by:
        print(f"(c) / (a): {by['c'] / by['a']:.1f}x")


if __name__ == "__main__":
    main()
