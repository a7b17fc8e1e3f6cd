"""The on-disk layout every loader reads and `slotsweep make-data` writes.

A dataset root holds three folders; the names below are the defaults the loaders look for when
given only a root (``--data-dir``)::

    ROOT/
      json/train.json        index of the training split   (dataset.json_dir = ROOT/json)
      json/val.json          index of the validation split
      frames/<video>/000000.jpg ...                          (dataset.img_dir  = ROOT/frames)
      masks/<video>/000000.png  ...   optional               (dataset.mask_dir = ROOT/masks)

An index file (``<json_dir>/<split>.json``) is::

    {
      "format": "slotsweep.videos/v1",
      "split": "train",
      "videos": [
        {
          "id": "video_00000",
          "frames": ["video_00000/000000.jpg", ...],   # relative to img_dir, in temporal order
          "masks":  ["video_00000/000000.png", ...],   # optional; relative to mask_dir
          "height": 64, "width": 64,                    # optional, informative
          "label": "disk",                              # optional category, for downstream tasks
          "objects": [{"id": 1, "shape": "disk", "color": [255, 0, 0], "size": 9.5}, ...]
        }
      ]
    }

Masks are single-channel 8-bit PNGs whose pixel value is the instance id (0 = background); an id
names the same object in every frame of its video. ``objects`` carries per-object attributes
(shape, colour, size, ...) for the object-level probe of ``slotsweep evaluate``; ``label`` is the
video's category for its clip-level tasks. Loaders ignore keys they do not know.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FORMAT_VERSION = "slotsweep.videos/v1"
JSON_DIRNAME = "json"
FRAMES_DIRNAME = "frames"
MASKS_DIRNAME = "masks"
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_SUFFIX = ".png"


def frame_name(index: int, suffix: str) -> str:
    """File name of frame ``index`` inside a video folder (zero-padded so names sort in time)."""
    return f"{index:06d}{suffix}"


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON to ``path`` atomically: a temporary sibling named after this
    process, then a rename, so a reader never sees half a file and two writers never share one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def write_index(json_dir: str | Path, split: str, videos: Sequence[dict[str, Any]]) -> Path:
    """Write ``<json_dir>/<split>.json`` atomically and return its path."""
    json_dir = Path(json_dir)
    json_dir.mkdir(parents=True, exist_ok=True)
    path = json_dir / f"{split}.json"
    write_json(path, {"format": FORMAT_VERSION, "split": split, "videos": list(videos)})
    return path
