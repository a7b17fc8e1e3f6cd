"""Callbacks of every run: slot visualisations, RNG state in checkpoints, the config beside them."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from core.config import Config, config_to_yaml
from core.names import BEST_JSON, METRICS_KEY, VISUALS_DIRNAME, checkpoint_path
from core.training.selection import selection_key

CONFIG_KEY = "slotsweep_config"  # the resolved config (YAML text) inside every checkpoint
_PALETTE = torch.tensor([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
    [0, 128, 128], [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    [170, 255, 195],
], dtype=torch.float32) / 255.0  # fmt: skip


def feature_pca(
    features: torch.Tensor, reconstruction: torch.Tensor, grid: tuple[int, int], size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target features and their reconstruction (T, P, F) as RGB images (T, 3, size, size): both
    projected on the first three principal components of the target features."""
    T, _, Fdim = features.shape
    x = features.float().reshape(-1, Fdim)
    mean = x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    basis = v[:3].T  # (F, 3)
    a = (x - mean) @ basis
    b = (reconstruction.float().reshape(-1, Fdim) - mean) @ basis
    lo, hi = a.min(0).values, a.max(0).values
    out = []
    for y in (a, b):
        img = ((y - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
        img = img.reshape(T, *grid, 3).permute(0, 3, 1, 2)
        out.append(F.interpolate(img, size=(size, size), mode="nearest"))
    return out[0], out[1]


def slot_grid(
    video: torch.Tensor,
    masks: torch.Tensor,
    mean: tuple,
    std: tuple,
    features: torch.Tensor | None = None,
    reconstruction: torch.Tensor | None = None,
    true: torch.Tensor | None = None,
) -> torch.Tensor:
    """One image (3, H', W') of a clip: row 1 frames, rows 2..K+1 each slot's mask applied to the
    frames, then the frames overlaid with each pixel's argmax slot colour, when given the ground
    truth overlaid the same way (one colour per object id, background left plain), and the
    target features and their reconstruction (first three principal components as RGB).

    ``video``: (T, 3, H, W) normalised; ``masks``: (T, K, h, w) soft masks; ``features`` and
    ``reconstruction``: (T, h*w, F); ``true``: (T, H, W) object ids (0 = background).
    """
    T, _, H, W = video.shape
    K = masks.shape[1]
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    frames = (video.float() * s + m).clamp(0, 1)
    up = F.interpolate(masks.float(), size=(H, W), mode="bilinear", align_corners=False)
    per_slot = frames.unsqueeze(1) * up.unsqueeze(2)  # (T, K, 3, H, W)
    colours = _PALETTE[torch.arange(K) % len(_PALETTE)]  # (K, 3)
    seg = colours[up.argmax(dim=1)].permute(0, 3, 1, 2)  # (T, 3, H, W)
    overlay = 0.5 * frames + 0.5 * seg
    rows = [frames, *per_slot.unbind(1), overlay]  # each (T, 3, H, W)
    if true is not None:
        ids = true.long()
        if ids.shape[-2:] != (H, W):
            ids = F.interpolate(ids[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
        truth = _PALETTE[(ids - 1) % len(_PALETTE)].permute(0, 3, 1, 2)
        background = (ids == 0).unsqueeze(1)
        rows.append(torch.where(background, frames, 0.5 * frames + 0.5 * truth))
    if features is not None and reconstruction is not None:
        grid_hw = (masks.shape[-2], masks.shape[-1])
        target, recon = feature_pca(features, reconstruction, grid_hw, H)
        rows += [target, recon]
    pad = 2
    grid = torch.ones(3, len(rows) * (H + pad) + pad, T * (W + pad) + pad)
    for r, row in enumerate(rows):
        for t in range(T):
            y, x = pad + r * (H + pad), pad + t * (W + pad)
            grid[:, y : y + H, x : x + W] = row[t]
    return grid


def grid_labels(slots: int, truth: bool, features: bool) -> list[str]:
    """The row names of :func:`slot_grid`'s image, top to bottom."""
    labels = ["input", *(f"slot {i + 1}" for i in range(slots)), "overlay"]
    labels += ["ground truth"] if truth else []
    labels += ["features (PCA)", "reconstruction"] if features else []
    return labels


def labelled_image(grid: torch.Tensor, labels: list[str], title: str | None = None,
                   min_frame: int = 128, pad: int = 2) -> Image.Image:
    """:func:`slot_grid`'s image scaled up (nearest, whole factors) until a frame is at least
    ``min_frame`` pixels wide, with its row names on the left, frame numbers on top and an
    optional title: readable in MLflow's image grid and in reports."""
    from PIL import ImageDraw, ImageFont

    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    height, width = array.shape[:2]
    cell = (height - pad) // len(labels)  # a row: the frame and its padding
    scale = max(1, math.ceil(min_frame / max(1, cell - pad)))
    image = Image.fromarray(array).resize((width * scale, height * scale), Image.NEAREST)
    font = ImageFont.load_default(size=max(12, min(18, cell * scale // 6)))
    left = 12 + max(int(font.getlength(label)) for label in labels)
    top = 30 + (30 if title else 0)
    out = Image.new("RGB", (image.width + left + 8, image.height + top + 8), "white")
    out.paste(image, (left, top))
    draw = ImageDraw.Draw(out)
    for r, label in enumerate(labels):
        y = top + (pad + r * cell + (cell - pad) / 2) * scale
        draw.text((left - 8, y), label, fill="black", font=font, anchor="rm")
    frames = (width - pad) // cell if cell else 0
    for t in range(frames):
        x = left + (pad + t * cell + (cell - pad) / 2) * scale
        draw.text((x, top - 6), f"t={t}", fill="black", font=font, anchor="ms")
    if title:
        draw.text((left, 8), title, fill="black", font=font, anchor="la")
    return out


class SlotVisualizer(pl.Callback):
    """Every ``every`` steps, after validation: frames, per-slot masks and overlays to TensorBoard
    (``val/slots``) and to ``<run_dir>/visualizations/step=N.png``."""

    def __init__(self, run_dir: str | Path, every: int, mean: tuple, std: tuple) -> None:
        self.dir = Path(run_dir) / VISUALS_DIRNAME
        self.every, self.mean, self.std = every, mean, std
        self._last_step = -1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        visual = getattr(pl_module, "last_visual", None)
        if trainer.sanity_checking or visual is None or not trainer.is_global_zero:
            return
        if step == self._last_step or (step % self.every and step != trainer.max_steps):
            return
        self._last_step = step
        grid = slot_grid(visual["video"], visual["masks"], self.mean, self.std,
                         visual.get("features"), visual.get("reconstruction"), visual.get("true"))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("val/slots", grid, global_step=step)
        self.dir.mkdir(parents=True, exist_ok=True)
        labels = grid_labels(visual["masks"].shape[1], visual.get("true") is not None,
                             visual.get("features") is not None
                             and visual.get("reconstruction") is not None)
        labelled_image(grid, labels, title=f"step {step}").save(self.dir / f"step={step}.png")


class RunStateCallback(pl.Callback):
    """Puts the resolved config and the RNG states into every checkpoint, restores the RNGs on
    resume (so a resumed run draws what a straight run would)."""

    def __init__(self, cfg: Config) -> None:
        self.yaml = config_to_yaml(cfg)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CONFIG_KEY] = self.yaml
        checkpoint[METRICS_KEY] = {
            "step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        }
        _, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        checkpoint["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [int(version), list(internal), gauss_next],
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get("rng")
        if state:
            torch.set_rng_state(state["torch"])
            keys, pos, has_gauss, cached = state["numpy"]
            keys = np.array(keys, dtype=np.uint32)
            np.random.set_state(("MT19937", keys, pos, has_gauss, cached))
            version, internal, gauss_next = state["python"]
            random.setstate((version, tuple(internal), gauss_next))


class BestCheckpoint(pl.Callback):
    """Keeps ``best.ckpt``: the checkpoint with the best ``metric`` (``mode`` max or min), ties
    broken by ``tie_break`` (same direction), and writes ``<run_dir>/best.json`` describing it.

    Unlike Lightning's ``ModelCheckpoint(monitor=...)`` it breaks ties, and its state (the best
    score so far) travels in every checkpoint, so a resumed run keeps the right best.
    """

    def __init__(
        self, run_dir: str | Path, path: str | Path, metric: str, mode: str = "max",
        tie_break: str | None = None,
    ) -> None:
        self.run_dir, self.path = Path(run_dir), Path(path)
        self.metric, self.mode, self.tie_break = metric, mode, tie_break
        self.best: dict[str, Any] | None = None

    def _key(self, metrics: dict[str, float]) -> tuple[float, float]:
        return selection_key(metrics, self.metric, self.mode, self.tie_break)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        value = metrics.get(self.metric)
        if value is None or value != value:  # missing or NaN: nothing to compare
            return
        if self.best is not None and self._key(metrics) <= self._key(self.best["metrics"]):
            return
        self.best = {"step": trainer.global_step, "metric": self.metric, "mode": self.mode,
                     "tie_break": self.tie_break, "score": value, "metrics": metrics,
                     "checkpoint": str(self.path)}
        trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes
        if trainer.is_global_zero:
            import json

            (self.run_dir / BEST_JSON).write_text(json.dumps(self.best, indent=1))

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class StepCheckpoint(pl.Callback):
    """``checkpoints/step=N.ckpt`` every ``every`` steps.

    Saved after validation when a validation runs at that step (so the file carries that
    step's ``val/*`` metrics and a resume does not skip the validation), else at the end of the
    training batch. Re-saving a step (after a resume) overwrites the file.
    """

    def __init__(self, dirpath: str | Path, every: int, val_every: int) -> None:
        self.dir, self.every, self.val_every = Path(dirpath), every, val_every

    def path(self, step: int) -> Path:
        return checkpoint_path(self.dir, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and step % self.val_every != 0:  # no validation at this step
            trainer.save_checkpoint(self.path(step))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.sanity_checking and step > 0 and step % self.every == 0:
            trainer.save_checkpoint(self.path(step))
