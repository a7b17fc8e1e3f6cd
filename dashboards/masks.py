"""Slot masks of trials at their best step, on the same validation clips: a labelled image per
trial (input frames, each slot, the overlay, the ground truth) and its slot diagnostics.

Each trial's result is kept beside its checkpoint (``report_masks.png`` / ``.json``) and made
again only when ``best.ckpt`` changed, so refreshing a report during a sweep stays cheap.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from dashboards.analysis import slot_diagnostics
from dashboards.data import Trial

PANEL_PNG, PANEL_JSON = "report_masks.png", "report_masks.json"
FRAME_PX = 144  # one frame's width in the image, at least: large enough to judge a mask
LAYOUT_VERSION = 3  # kept panels of an older layout are drawn again


def _stamp(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def trial_masks(trial: Trial, data_dir: str | None, clips: int = 1) -> dict[str, Any] | None:
    """``{"png": base64 PNG, "diagnostics": {...}}`` of ``trial`` at its best checkpoint, or
    None when it has none. Raises the core's one-line errors (a corrupt checkpoint)."""
    if trial.checkpoint is None:
        return None
    png, meta = trial.run_dir / PANEL_PNG, trial.run_dir / PANEL_JSON
    stamp = _stamp(trial.checkpoint)
    if png.is_file() and meta.is_file():
        kept = json.loads(meta.read_text())
        if (kept.get("checkpoint"), kept.get("clips"), kept.get("layout")) == (
                stamp, clips, LAYOUT_VERSION):
            return {"png": base64.b64encode(png.read_bytes()).decode(),
                    "diagnostics": kept["diagnostics"]}
    from core.tools import predict_masks

    pred = predict_masks(trial.checkpoint, data_dir, clips=clips)
    masks = pred["masks"].numpy()  # (N, T, K, h, w)
    diagnostics = slot_diagnostics(masks.reshape(-1, *masks.shape[2:]))
    image = _panel(pred, f"trial {trial.trial_id}, step {trial.step}")
    png.write_bytes(image)
    meta.write_text(json.dumps({"checkpoint": stamp, "clips": clips, "layout": LAYOUT_VERSION,
                                "diagnostics": diagnostics}))
    return {"png": base64.b64encode(image).decode(), "diagnostics": diagnostics}


def _panel(pred: dict[str, Any], title: str) -> bytes:
    """The first clip as core's labelled grid: rows input, slot 1..K, overlay, ground truth."""
    from core.training.callbacks import grid_labels, labelled_image, slot_grid

    video, masks = pred["video"][0], pred["masks"][0]
    true = pred["true"][0] if pred["true"] is not None else None
    grid = slot_grid(video, masks, pred["mean"], pred["std"], true=true)
    image = labelled_image(grid, grid_labels(masks.shape[1], true is not None, False),
                           title=title, min_frame=FRAME_PX)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
