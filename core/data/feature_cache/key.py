"""Which feature cache a run needs: the key, the folder it names and where caches live.

The key is a digest of everything that determines the features: backbone name, weights hash,
layer, image size, resize mode, mean/std, storage dtype and the frame files of each split (path
and byte size). The folder is ``<root>/<backbone>-<img_size>px-<key>/``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.data.config import FeatureCacheConfig
from core.data.prepare import cache_root
from core.errors import SlotsweepError
from core.hashing import json_digest
from core.names import FEATURE_CACHE_ENV
from core.paths import PathError, writable_dir

FORMAT = "slotsweep.features/v1"
MANIFEST = "manifest.json"  # in the cache folder: key inputs, videos, shards


def stored_dtype(name: str) -> Any:
    """``feature_cache.dtype`` -> the torch dtype features are stored in (torch is imported here
    only: finding a cache's folder needs no torch)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


class CacheError(SlotsweepError):
    """A cache folder that is incomplete, corrupt or not the one asked for."""


def cache_dir(cfg: FeatureCacheConfig) -> Path:
    """Where caches of this config live: ``feature_cache.dir``, else ``$SLOTSWEEP_FEATURE_CACHE``,
    else ``$SLOTSWEEP_CACHE/features`` (``~/.cache/slotsweep/features``)."""
    if cfg.dir:
        return Path(cfg.dir).expanduser().resolve()
    if os.environ.get(FEATURE_CACHE_ENV):
        return Path(os.environ[FEATURE_CACHE_ENV]).expanduser().resolve()
    return cache_root() / "features"


def writable_cache_dir(cfg: FeatureCacheConfig) -> Path:
    """:func:`cache_dir`, once it is known that a cache can be built there (else one line)."""
    try:
        return writable_dir(cache_dir(cfg), "feature cache folder")
    except PathError as exc:
        raise CacheError(f"{exc} (feature_cache.dir), or set feature_cache.mode=off") from None


def refusal(cfg: Any) -> str | None:
    """Why a run's features cannot come from a cache (``None``: they can). ``cfg``: a Config."""
    backbone = cfg.model.encoder.backbone
    if not backbone.frozen:
        return ("model.encoder.backbone.frozen=false: the backbone trains, so its features "
                "change every step")
    if cfg.dataset.hflip > 0:
        return (f"dataset.hflip={cfg.dataset.hflip} flips training clips at random: features of "
                "flipped frames are not in a cache (set dataset.hflip=0 to use one)")
    return None


def _frame_list_digest(records: Sequence[Any]) -> str:
    """sha256 over every frame's ``path\\0size\\n``, in record order."""
    h = hashlib.sha256()
    for record in records:
        for path in record.frames:
            try:
                size = os.stat(path).st_size
            except OSError as exc:
                raise CacheError(
                    f"frame {path} cannot be read ({exc.strerror}): fix the dataset") from None
            h.update(f"{path}\0{size}\n".encode())
    return h.hexdigest()


def key_inputs(encoder: Any, dataset: Any, splits: dict[str, Sequence[Any]], dtype: str,
               backbone: str, normalization: tuple[Sequence[float], Sequence[float]],
               ) -> dict[str, Any]:
    """Everything that determines the cached features (the manifest's ``key_inputs``)."""
    mean, std = normalization
    return {
        "format": FORMAT,
        "backbone": backbone,
        "weights_hash": encoder.weights_hash(),
        "layer": int(encoder.layer_index),
        "img_size": int(dataset.img_size),
        "resize": dataset.resize,
        "mean": [round(float(v), 8) for v in mean],
        "std": [round(float(v), 8) for v in std],
        "dtype": dtype,
        "frames": {split: _frame_list_digest(records) for split, records in splits.items()},
    }


def folder_name(inputs: dict[str, Any]) -> str:
    """``<backbone>-<img_size>px-<first 16 hex digits of json_digest(inputs)>``."""
    digest = json_digest(inputs, 16)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in inputs["backbone"])
    return f"{name}-{inputs['img_size']}px-{digest}"
