"""A features file (core/downstream/features.py's format) whose answers are known, without a
model: for the downstream tests and bench/downstream.py."""

from __future__ import annotations

import numpy as np
import torch

from core.downstream.features import FORMAT

SHAPES = ("disk", "square", "triangle")


def made_features(videos: int = 120, clips: int = 2, classes: int = 6, signal: float = 3.0,
                  seed: int = 0, frames: int = 2, n_slots: int = 4, slot_dim: int = 16,
                  backbone_dim: int = 24) -> dict:
    """A features file whose trained slots carry each video's label (``signal`` apart), whose
    untrained slots and backbone carry nothing, and whose matched slot of each object carries its
    shape."""
    g = np.random.default_rng(seed)
    T, K, D, F = frames, n_slots, slot_dim, backbone_dim
    video_label = g.integers(classes, size=videos)
    centres = g.normal(size=(classes, D))
    n = videos * clips
    label = np.repeat(video_label, clips)
    slots = g.normal(size=(n, T, K, D)) + signal * centres[label][:, None, None, :]
    rows, matched = [], []
    shape_centres = g.normal(size=(3, D))
    for clip in range(n):
        for obj in range(3):
            shape = int(g.integers(3))
            k = obj % K
            slots[clip, :, k] += signal * shape_centres[shape]
            rows.append({"clip": clip, "id": obj + 1, "shape": SHAPES[shape], "color": "#ffffff",
                         "size": float(g.uniform(4, 16))})
            matched.append(k)
    m = len(rows)
    return {"format": FORMAT, "split": "val", "slots": torch.tensor(slots, dtype=torch.float32),
            "untrained_slots": torch.randn(n, T, K, D), "backbone": torch.randn(n, F),
            "video_ids": [f"video_{i // clips:03d}" for i in range(n)], "starts": [0] * n,
            "labels": [f"class{x}" for x in label], "n_objects": [3] * n, "object_rows": rows,
            "object_slot": torch.tensor(matched), "object_untrained_slot": torch.tensor(matched),
            "object_backbone": torch.randn(m, F), "model": {"backbone": "made"},
            "checkpoint": "made.ckpt", "config": ""}
