"""Finding videos on disk: index files (SAYCam layout) and plain frame folders.

Both readers return :class:`VideoRecord` lists; :func:`check_records` then proves, before any
training starts, that every clip can be read. Every problem is a :class:`DataError` whose one-line
message names the file and says what to do.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from core.data import layout
from core.errors import DataError


@dataclass
class VideoRecord:
    """One video: its frame files in temporal order and, optionally, one mask per frame, its
    objects' attributes and its category (``label``, for downstream evaluation)."""

    id: str
    frames: list[Path]
    masks: list[Path] | None = None
    objects: list[dict[str, Any]] = field(default_factory=list)
    label: str | None = None

    def __len__(self) -> int:
        return len(self.frames)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _require_dir(path: str | Path | None, what: str, key: str) -> Path:
    if path is None:
        raise DataError(f"{what} is not set: set {key} in the config or pass --data-dir")
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist: fix {key} or --data-dir")
    return path


def read_index(
    json_dir: str | Path | None, split: str, img_dir: str | Path | None, mask_dir: str | Path | None
) -> list[VideoRecord]:
    """Read ``<json_dir>/<split>.json`` (format in :mod:`core.data.layout`)."""
    json_root = _require_dir(json_dir, "index directory", "dataset.json_dir")
    frames_root = _require_dir(img_dir, "frame directory", "dataset.img_dir")
    path = json_root / f"{split}.json"
    if not path.is_file():
        found = sorted(p.name for p in json_root.glob("*.json"))
        hint = f" (found: {', '.join(found)})" if found else ""
        raise DataError(f"index file {path} does not exist{hint}: write it or fix the split name")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"index file {path} is not valid JSON ({exc}): regenerate it") from None
    videos = payload.get("videos") if isinstance(payload, dict) else None
    if not isinstance(videos, list):
        raise DataError(f"index file {path} has no 'videos' list: see core/data/layout.py")
    masks_root = Path(mask_dir) if mask_dir is not None else None
    records = []
    for i, entry in enumerate(videos):
        if not isinstance(entry, dict) or not isinstance(entry.get("frames"), list):
            raise DataError(f"index file {path}: video #{i} has no 'frames' list")
        vid = str(entry.get("id", f"#{i}"))
        masks = entry.get("masks")
        mask_paths = None
        if masks:
            if masks_root is None:
                raise DataError(
                    f"index file {path}: video {vid} lists masks but dataset.mask_dir is not set"
                )
            if len(masks) != len(entry["frames"]):
                raise DataError(
                    f"index file {path}: video {vid} has {len(entry['frames'])} frames but "
                    f"{len(masks)} masks: list one mask per frame"
                )
            mask_paths = [masks_root / m for m in masks]
        frames = [frames_root / f for f in entry["frames"]]
        label = entry.get("label")
        if label is not None and not isinstance(label, (str, int)):
            raise DataError(f"index file {path}: video {vid} has label {label!r}: a label is a "
                            "category name (a string or an integer)")
        records.append(VideoRecord(vid, frames, mask_paths, list(entry.get("objects") or []),
                                   None if label is None else str(label)))
    return records


def _image_files(folder: Path) -> list[Path]:
    files = [
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in layout.IMAGE_SUFFIXES
    ]
    return sorted(files, key=lambda p: _natural_key(p.name))


def scan_folders(
    img_dir: str | Path | None,
    split: str,
    mask_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    val_split: str = layout.VAL_SPLIT,
) -> list[VideoRecord]:
    """Videos stored as folders of frames (``format: folders``).

    ``img_dir/<video>/*.jpg`` (or ``img_dir/<split>/<video>/...`` when ``train/`` and ``val/``
    exist); masks at ``mask_dir/<same relative folder>/<frame stem>.png``.
    """
    root = _require_dir(img_dir, "frame directory", "dataset.img_dir")
    split_root = root / split
    has_splits = split_root.is_dir() and (root / val_split).is_dir()
    base = split_root if has_splits else root
    videos = sorted(
        (p for p in base.iterdir() if p.is_dir() and _image_files(p)),
        key=lambda p: _natural_key(p.name),
    )
    if not has_splits:
        threshold = int(val_fraction * 1000)
        want_val = split == val_split

        def is_val(name: str) -> bool:
            return zlib.crc32(name.encode()) % 1000 < threshold

        videos = [v for v in videos if is_val(v.name) == want_val]
    records = []
    for folder in videos:
        frames = _image_files(folder)
        masks = None
        if mask_dir is not None:
            mask_folder = Path(mask_dir) / folder.relative_to(root)
            if mask_folder.is_dir():
                masks = [mask_folder / (f.stem + layout.MASK_SUFFIX) for f in frames]
        records.append(VideoRecord(str(folder.relative_to(root)), frames, masks))
    return records


def scan_labelled_images(root: str | Path) -> list[VideoRecord]:
    """A labelled image set in category folders, ``ROOT/<category>/*.jpg`` (the layout of the
    labelled SAYCam frames), as single-frame videos whose ``label`` is their folder's name."""
    root = _require_dir(root, "labelled image folder", "--images")
    categories = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    records = [VideoRecord(f"{folder.name}/{image.name}", [image], label=folder.name)
               for folder in categories for image in _image_files(folder)]
    if not records:
        raise DataError(f"{root} holds no images in category folders: lay it out as "
                        "ROOT/<category>/<image>.jpg")
    return records


def _open_header(path: Path, kind: str) -> tuple[int, int]:
    if not path.is_file():
        raise DataError(f"{kind} {path} does not exist: restore it or drop it from the index")
    try:
        with Image.open(path) as image:
            image.verify()
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{kind} {path} cannot be read ({exc}): replace or remove it") from None


def check_records(
    records: Sequence[VideoRecord], ep_length: int, split: str, where: str, images: str = "first"
) -> None:
    """Prove before training that every clip can be built.

    Checks: at least one video; every video has ``ep_length`` frames; every listed file exists;
    masks are all-or-none within the split; and, for the first frame of each video
    (``images="first"``) or every frame (``"all"``), that the image decodes and its mask has the
    frame's size.
    """
    if not records:
        raise DataError(f"no videos in the {split} split of {where}: add videos or fix the path")
    with_masks = [r for r in records if r.masks is not None]
    if with_masks and len(with_masks) != len(records):
        missing = next(r for r in records if r.masks is None)
        raise DataError(
            f"video {missing.id} in the {split} split of {where} has no masks while others do: "
            "give every video masks or none"
        )
    for record in records:
        if len(record) < ep_length:
            raise DataError(
                f"video {record.id} in {where} has {len(record)} frames, fewer than "
                f"dataset.ep_length={ep_length}: lower ep_length or drop the video"
            )
        for path in record.frames:
            if not path.is_file():
                raise DataError(f"frame {path} does not exist: restore it or drop it from {where}")
        for path in record.masks or ():
            if not path.is_file():
                raise DataError(f"mask {path} does not exist: restore it or drop it from {where}")
        if images == "none":
            continue
        count = len(record) if images == "all" else 1
        for t in range(count):
            size = _open_header(record.frames[t], "frame")
            if record.masks is not None:
                mask_size = _open_header(record.masks[t], "mask")
                if mask_size != size:
                    raise DataError(
                        f"mask {record.masks[t]} is {mask_size[0]}x{mask_size[1]} but its frame "
                        f"{record.frames[t]} is {size[0]}x{size[1]}: masks must match their frames"
                    )
