"""The ``dataset`` section of the config: where clips come from and how they are shaped."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from core.data import layout
from core.errors import ConfigError

FORMATS = ("saycam", "folders")
VAL_CLIP_MODES = ("all", "first")
RESIZE_MODES = ("crop", "stretch")
CHECK_MODES = ("first", "all", "none")
CACHE_MODES = ("auto", "build", "off")
CACHE_GPU_MODES = ("auto", "on", "off")
CACHE_DTYPES = ("bf16", "fp16")


@dataclass
class SyntheticDataConfig:
    """Generated videos (``slotsweep make-data synthetic``) that a run makes itself if missing."""

    videos: int = 64
    frames: int = 8
    size: int = 64
    seed: int = 0
    val_fraction: float = 0.25
    min_objects: int = 2
    max_objects: int = 6
    digits: bool = False
    textured_background: bool = False
    min_size: float = 0.12  # object half-extent, fraction of size
    max_size: float = 0.3
    colors: int | None = None  # None: one colour per object; n: drawn from n colours, shared
    max_speed: float | None = None  # pixels per frame; None: 0.06 * size


@dataclass
class DatasetConfig:
    """Data settings (the ``dataset:`` block of a config plus what a loader needs to be exact).

    ``format: saycam`` reads ``<json_dir>/<split>.json`` index files whose frame paths are relative
    to ``img_dir`` (and mask paths to ``mask_dir``); see :mod:`core.data.layout`.
    ``format: folders`` reads any folder of videos: every sub-folder of ``img_dir`` holding image
    files is one video (frames in natural name order); masks, when ``mask_dir`` is set, are PNG id
    maps at ``<mask_dir>/<video>/<frame stem>.png``. If ``img_dir`` has ``train/`` and ``val/``
    sub-folders they are the splits, otherwise ``val_fraction`` of the videos (chosen by a stable
    hash of their names) form the validation split.

    ``synthetic``: when set, the run generates these videos once (into ``--data-dir``, or a
    cache folder named after the settings) if the index files are missing, then reads them like
    any other dataset.
    """

    format: str = "saycam"
    json_dir: str | None = None
    img_dir: str | None = None
    mask_dir: str | None = None
    train_split: str = layout.TRAIN_SPLIT
    val_split: str = layout.VAL_SPLIT
    img_size: int = 224
    ep_length: int = 8
    batch_size: int = 16
    val_batch_size: int | None = None
    num_workers: int = 4
    val_clips: str = "all"
    resize: str = "crop"
    check_images: str = "first"
    val_fraction: float = 0.1
    mean: list[float] | None = None
    std: list[float] | None = None
    hflip: float = 0.0  # probability of flipping a training clip left-right (all its frames)
    synthetic: SyntheticDataConfig | None = None

    def validate(self) -> None:
        """Raise :class:`ConfigError` for impossible values (one line, naming the key)."""
        choices = {
            "format": FORMATS,
            "val_clips": VAL_CLIP_MODES,
            "resize": RESIZE_MODES,
            "check_images": CHECK_MODES,
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(
                    f"dataset.{key}={getattr(self, key)!r} is not one of {', '.join(valid)}"
                )
        positive = ("img_size", "ep_length", "batch_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"dataset.{key} must be >= 1, got {getattr(self, key)}")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ConfigError(f"dataset.val_batch_size must be >= 1, got {self.val_batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"dataset.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"dataset.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError(f"dataset.hflip is a probability in [0, 1], got {self.hflip}")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value is not None and len(value) != 3:
                raise ConfigError(f"dataset.{key} needs 3 values (R, G, B), got {list(value)}")


def resolve_paths(cfg: DatasetConfig, data_dir: str | Path | None = None) -> DatasetConfig:
    """Return a copy whose directories are absolute.

    Relative ``json_dir`` / ``img_dir`` / ``mask_dir`` are taken relative to ``data_dir`` (the
    ``--data-dir`` flag; default: the current directory). Unset ones default to the layout of
    :mod:`core.data.layout` under ``data_dir``: ``json/``, ``frames/`` and, when it exists,
    ``masks/``. For ``format: folders`` an unset ``img_dir`` is ``data_dir`` itself.
    """
    root = Path(data_dir).expanduser() if data_dir is not None else Path.cwd()

    def absolute(value: str | None, default: str | None) -> str | None:
        if value is None:
            return None if default is None else str((root / default).resolve())
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (root / path).resolve())

    if cfg.format == "folders":
        img_dir = absolute(cfg.img_dir, ".")
        json_dir = absolute(cfg.json_dir, None)
    else:
        img_dir = absolute(cfg.img_dir, layout.FRAMES_DIRNAME)
        json_dir = absolute(cfg.json_dir, layout.JSON_DIRNAME)
    default_masks = layout.MASKS_DIRNAME if (root / layout.MASKS_DIRNAME).is_dir() else None
    if cfg.format == "folders":
        default_masks = None
    mask_dir = absolute(cfg.mask_dir, default_masks)
    return replace(cfg, json_dir=json_dir, img_dir=img_dir, mask_dir=mask_dir)


@dataclass
class FeatureCacheConfig:
    """The ``feature_cache`` section of a run.

    ``mode``: ``auto`` uses a cache built for exactly this backbone and data when one exists,
    ``build`` also builds it when missing, ``off`` always runs the backbone. ``dir``: where caches
    live (default ``$SLOTSWEEP_FEATURE_CACHE``, else ``$SLOTSWEEP_CACHE/features``). ``gpu``:
    ``auto`` keeps a split in GPU memory when it fits (at most half of the free memory), ``on``
    insists, ``off`` reads memory-mapped shards in the loader workers.
    """

    mode: str = "auto"
    dir: str | None = None
    dtype: str = "bf16"
    gpu: str = "auto"
    shard_mb: float = 256.0

    def validate(self) -> None:
        # YAML 1.1 reads off / on as booleans: take them back as the words meant
        if str(self.mode).lower() == "false":
            self.mode = "off"
        if str(self.gpu).lower() in ("false", "true"):
            self.gpu = "off" if str(self.gpu).lower() == "false" else "on"
        choices = (("mode", CACHE_MODES), ("gpu", CACHE_GPU_MODES), ("dtype", CACHE_DTYPES))
        for key, valid in choices:
            if getattr(self, key) not in valid:
                raise ConfigError(
                    f"feature_cache.{key}={getattr(self, key)!r} is not one of {', '.join(valid)}"
                )
        if self.shard_mb <= 0:
            raise ConfigError(f"feature_cache.shard_mb must be > 0, got {self.shard_mb}")
