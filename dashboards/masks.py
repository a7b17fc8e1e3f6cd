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
CELL_INCHES = 1.5  # one frame's width in the image: large enough to judge a mask
LAYOUT_VERSION = 2  # kept panels of an older layout are drawn again


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
    """One clip as a labelled grid: rows input, slot 1..K, overlay, ground truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from core.training.callbacks import slot_grid

    video, masks = pred["video"][0], pred["masks"][0]
    true = pred["true"][0] if pred["true"] is not None else None
    grid = slot_grid(video, masks, pred["mean"], pred["std"], true=true)
    image = grid.permute(1, 2, 0).numpy()
    frames, k = video.shape[0], masks.shape[1]
    labels = ["input", *(f"slot {i + 1}" for i in range(k)), "overlay"]
    labels += ["ground truth"] if true is not None else []
    rows = len(labels)
    fig, ax = plt.subplots(figsize=(0.9 + CELL_INCHES * frames, 0.5 + CELL_INCHES * rows),
                           dpi=100)
    ax.imshow(image, interpolation="nearest")
    row_h = image.shape[0] / rows
    ax.set_yticks([row_h * (r + 0.5) for r in range(rows)], labels)
    ax.set_xticks([image.shape[1] / frames * (t + 0.5) for t in range(frames)],
                  [f"t={t}" for t in range(frames)])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=11)
    out = io.BytesIO()
    fig.savefig(out, format="png", bbox_inches="tight")  # the row labels stay inside
    plt.close(fig)
    return out.getvalue()

