"""Does the model learn objects? Validation FG-ARI / mBO of a trained slotsweep model beside the
untrained model and three segmentations that learn nothing, on generated moving shapes.

    python bench/learning.py                    # shapes_cpu on a 2-core CPU (about 8 minutes)
    python bench/learning.py --steps 1500       # shorter (the slow test runs this, ~5 minutes)
    python bench/learning.py --gpu              # the recipe's size: 224 px, ViT-B/14, B=16, T=8,
                                                # K=7, trained for --minutes (default 5)

Rows of the table, all scored by the same video FG-ARI / mBO on the same validation clips, with
masks on the backbone's patch grid resized to the ground truth the same way (bilinear, argmax):

  patch-grid oracle    the ground truth averaged over each patch: the best any model can score
                       with masks on this grid
  k-means, K slots     k-means on the frozen backbone's patch features of each clip (no learning)
  fixed stripes        K vertical stripes (knows nothing of the image)
  untrained model      the model of the training run, at step 0
  trained, step N      the model at each validation of a real ``core.train.train`` run
                       (Lightning, feature cache, checkpoints), as ``slotsweep train`` runs it

It also prints how linearly decodable a patch's position is from the backbone's features (R^2),
writes every figure to ``--json`` and the learned masks of the best checkpoint (frames, each slot,
overlay, ground truth) to ``--picture``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_CONFIG = "shapes_cpu"
GPU_CONFIG = "integrated_saycam"
# The recipe's model at its size on generated data: random ViT-B/14 weights (nothing can be
# downloaded) with the sine-cosine position embedding a trained ViT's features would carry.
GPU_OVERRIDES = [
    "model.encoder.backbone.weights=random",
    "model.encoder.backbone.sincos_pos_embed=0.5",
    "dataset.synthetic.videos=2048", "dataset.synthetic.frames=8", "dataset.synthetic.size=224",
    "dataset.synthetic.val_fraction=0.0625", "dataset.val_clips=first",
    "trainer.max_steps=1000000", "trainer.val_check_interval=250",
    "trainer.checkpoint_every=1000000", "trainer.visualize_every=1000000",
    "feature_cache.mode=build",
]


def _metrics() -> dict[str, Any]:
    from core.metrics import VideoARI, VideoIoU

    return {"ari": VideoARI(), "mbo": VideoIoU()}


def _per_frame(masks: Any) -> Any:
    """(B, T, ...) -> (B*T, 1, ...): every frame scored as a one-frame video."""
    return masks.flatten(0, 1).unsqueeze(1)


def score(cfg: Any, checkpoint: str | None = None) -> dict[str, Any]:
    """Video FG-ARI / mBO on the validation clips of ``cfg``.

    Without ``checkpoint``: the patch-grid oracle, k-means, stripes and the untrained model,
    seeded and built exactly as :func:`core.train.train` does, so "untrained" is the very model
    the training run starts from. With it: that trained model's decoder masks (what training
    logs as val/ari), the same masks scored frame by frame (slot identities need not persist), its
    slot-attention masks, and k-means frame by frame, so a gap between the video and the
    per-frame score shows how much is lost to slots changing identity between frames.
    """
    import pytorch_lightning as pl
    import torch

    from core.baselines import kmeans_masks, patch_oracle_masks, position_r2, stripe_masks
    from core.models.video import ATTN_MASKS, DECODER_MASKS, FEATURES
    from core.names import MASKS_KEY
    from core.train import feature_cache_for, make_datamodule
    from core.training.checkpoint import load_into
    from core.training.module import SlotModule

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    cfg, dm = make_datamodule(cfg, None)
    module = SlotModule(cfg).eval()
    if checkpoint is not None:
        load_into(module, checkpoint)
    cache = feature_cache_for(cfg, module.model.encoder, dm)
    if cache is not None:
        dm.use_features(cache, "off")
    grid = tuple(module.model.grid_size)
    k = cfg.globals.NUM_SLOTS
    names = (("decoder", "decoder_frames", "attention", "kmeans_frames") if checkpoint else
             ("oracle", "kmeans", "stripes", "untrained"))
    rows = {name: _metrics() for name in names}
    sample, clips = [], 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            true = batch[MASKS_KEY]
            outputs = module.model(batch)
            features = outputs[FEATURES].float()
            B, T = features.shape[:2]
            if checkpoint is None:
                masks = {
                    "oracle": (patch_oracle_masks(true, grid), true),
                    "kmeans": (kmeans_masks(features, k, grid, seed=cfg.seed), true),
                    "stripes": (stripe_masks(B, T, k, grid), true),
                    "untrained": (module._masks(outputs), true),
                }
            else:
                decoder = outputs[DECODER_MASKS].unflatten(-1, grid).float()
                frames = kmeans_masks(_per_frame(features), k, grid, seed=cfg.seed)
                masks = {
                    "decoder": (decoder, true),
                    "decoder_frames": (_per_frame(decoder), _per_frame(true)),
                    "attention": (outputs[ATTN_MASKS].unflatten(-1, grid).float(), true),
                    "kmeans_frames": (frames, _per_frame(true)),
                }
            for name, (m, t) in masks.items():
                for metric in rows[name].values():
                    metric.update(m, t)
            if len(sample) < 8:
                sample.append(features[:, 0])
            clips += B
    return {
        "scores": {name: {key: m.compute() for key, m in r.items()} for name, r in rows.items()},
        "position_r2": position_r2(torch.cat(sample), grid),
        "val_clips": clips,
        "grid": list(grid),
    }


def train_and_record(cfg: Any, run_dir: Path, minutes: float | None) -> dict[str, Any]:
    """A real training run; val FG-ARI / mBO at every validation, with the elapsed time."""
    import pytorch_lightning as pl

    from core.names import METRIC_ARI, METRIC_MBO
    from core.train import train
    from core.training.module import VAL_LOSS

    history: list[dict[str, float]] = []
    start = time.perf_counter()

    class Recorder(pl.Callback):
        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            m = trainer.callback_metrics
            if METRIC_ARI in m and not trainer.sanity_checking:
                history.append({"step": int(trainer.global_step), "ari": float(m[METRIC_ARI]),
                                "mbo": float(m[METRIC_MBO]), "loss": float(m[VAL_LOSS]),
                                "seconds": time.perf_counter() - start})
                print(f"  step {trainer.global_step:>6}  val/ari {float(m[METRIC_ARI]):.3f}  "
                      f"val/mbo {float(m[METRIC_MBO]):.3f}  val/loss {float(m[VAL_LOSS]):.4f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)

    extra = {"max_time": {"minutes": minutes}} if minutes else None
    result = train(cfg, [Recorder()], run_dir=run_dir, progress_bar=False, trainer_kwargs=extra)
    return {"history": history, "seconds": time.perf_counter() - start,
            "best_checkpoint": result["best_checkpoint"], "best_step": result["best_step"],
            "global_step": result["global_step"]}


def picture(checkpoint: str, path: Path, clips: int = 2) -> Path:
    """The learned masks of ``clips`` validation clips, stacked into one PNG at ``path``."""
    import numpy as np
    from PIL import Image

    from core.tools import visualize

    with tempfile.TemporaryDirectory() as tmp:
        pngs = visualize(checkpoint, output_dir=tmp, clips=clips)
        images = [np.asarray(Image.open(p).convert("RGB")) for p in pngs]
        gap = np.full((8, images[0].shape[1], 3), 255, np.uint8)
        stacked = np.concatenate([x for img in images for x in (img, gap)][:-1])
    big = Image.fromarray(stacked)
    big = big.resize((big.width * 2, big.height * 2), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    big.save(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="key=value for the run's config")
    parser.add_argument("--config", default=None,
                        help=f"default {CPU_CONFIG} ({GPU_CONFIG} with --gpu)")
    parser.add_argument("--gpu", action="store_true",
                        help="integrated_saycam's size on one GPU, trained for --minutes")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default: the config's trainer.max_steps)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="stop training after this long (default 5 with --gpu)")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--picture", default=None, help="write the learned masks here (PNG)")
    args = parser.parse_args()

    from core.config import load_config
    from core.errors import SlotsweepError

    config = args.config or (GPU_CONFIG if args.gpu else CPU_CONFIG)
    overrides = [*(GPU_OVERRIDES if args.gpu else ["feature_cache.mode=build"]), *args.overrides]
    if args.steps:
        overrides.append(f"trainer.max_steps={args.steps}")
    minutes = args.minutes if args.minutes is not None else (5.0 if args.gpu else None)
    try:
        cfg = load_config(config, overrides)
    except SlotsweepError as exc:
        raise SystemExit(f"bench/learning.py: {exc}") from None
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="slotsweep-learning-"))
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    g, d = cfg.globals, cfg.dataset
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"config {config}: K={g.NUM_SLOTS} slots of {g.SLOT_DIM}, B={d.batch_size} T="
          f"{d.ep_length}, {d.img_size} px, {cfg.trainer.max_steps if not minutes else '-'} "
          f"steps{f', {minutes} min' if minutes else ''}; {device}", flush=True)
    t0 = time.perf_counter()
    base = score(cfg)
    print(f"baselines on {base['val_clips']} val clips, grid {base['grid'][0]}x{base['grid'][1]}"
          f", in {time.perf_counter() - t0:.0f} s; position R^2 of the features "
          f"{base['position_r2']:.2f}", flush=True)
    run = train_and_record(cfg, run_dir, minutes)
    rows = [
        ("patch-grid oracle (ceiling)", base["scores"]["oracle"]),
        (f"k-means, K={g.NUM_SLOTS}, frozen features", base["scores"]["kmeans"]),
        (f"{g.NUM_SLOTS} fixed stripes", base["scores"]["stripes"]),
        ("untrained model (step 0)", base["scores"]["untrained"]),
        *((f"trained, step {h['step']}", h) for h in run["history"]),
    ]
    # val/loss: the objective training minimises (feature reconstruction + weighted contrast)
    print(f"\n{'':36}{'FG-ARI':>8}{'mBO':>8}{'val/loss':>10}")
    for name, s in rows:
        loss = f"{s['loss']:>10.4f}" if "loss" in s else ""
        print(f"{name:36}{s['ari']:>8.3f}{s['mbo']:>8.3f}{loss}")
    last = run["history"][-1] if run["history"] else None
    kmeans = base["scores"]["kmeans"]
    if last:
        print(f"\ntrained - k-means: FG-ARI {last['ari'] - kmeans['ari']:+.3f}, "
              f"mBO {last['mbo'] - kmeans['mbo']:+.3f}; training took {run['seconds']:.0f} s "
              f"({run['global_step']} steps), everything {time.perf_counter() - t0:.0f} s")
    if run["best_checkpoint"]:
        best = score(cfg, run["best_checkpoint"])["scores"]
        print(f"\nthe best checkpoint (step {run['best_step']}), scored three ways:")
        for name, key in (("decoder masks, per video (val/ari)", "decoder"),
                          ("decoder masks, per frame", "decoder_frames"),
                          ("slot-attention masks, per video", "attention"),
                          (f"k-means, K={g.NUM_SLOTS}, per frame", "kmeans_frames")):
            print(f"{name:36}{best[key]['ari']:>8.3f}{best[key]['mbo']:>8.3f}")
        run["best_scores"] = best
    figures = {"config": config, "overrides": overrides, "device": device, **base, **run,
               "total_seconds": time.perf_counter() - t0}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    if args.picture and run["best_checkpoint"]:
        print(f"masks of the best checkpoint (step {run['best_step']}): "
              f"{picture(run['best_checkpoint'], Path(args.picture))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
