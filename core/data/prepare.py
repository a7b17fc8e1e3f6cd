"""Make a run's generated dataset exist before it starts (once, race-free across trials)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from core.data import layout
from core.data.config import DatasetConfig, SyntheticDataConfig
from core.errors import ConfigError
from core.hashing import json_digest
from core.names import CACHE_ENV


def cache_root() -> Path:
    """``$SLOTSWEEP_CACHE`` or ``~/.cache/slotsweep``: generated data and feature caches."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "slotsweep")).expanduser()


def synthetic_dir(spec: SyntheticDataConfig) -> Path:
    """The cache folder of one generated dataset, named after everything that determines it
    (the generator's version included, so a cache written before labels existed is not read)."""
    from core.data.synthetic import GENERATOR_VERSION

    digest = json_digest({**asdict(spec), "generator_version": GENERATOR_VERSION}, 12)
    return cache_root() / "data" / f"synthetic-{spec.size}px-{digest}"


def _complete(root: Path) -> bool:
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete")) and (root / layout.JSON_DIRNAME / "train.json").is_file()


def ensure_synthetic(cfg: DatasetConfig, data_dir: str | Path | None) -> Path | None:
    """Generate ``cfg.synthetic`` into ``data_dir`` (or its cache folder) if not there yet.

    Returns the data root to read, or ``None`` when the config asks for no generated data.
    Writers build in a temporary sibling folder and rename it into place, so concurrent trials
    never see a half-written dataset.
    """
    spec = cfg.synthetic
    if spec is None:
        return None
    from core.data.synthetic import SyntheticSpec, write_synthetic_dataset

    root = Path(data_dir).expanduser() if data_dir is not None else synthetic_dir(spec)
    if _complete(root):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "dataset.json").is_file():
        return root  # a user's own dataset: read it as it is
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        try:
            gen = SyntheticSpec.from_options(spec)
            write_synthetic_dataset(tmp / "d", spec.videos, gen, seed=spec.seed,
                                    val_fraction=spec.val_fraction, image_format="png")
        except ValueError as exc:
            raise ConfigError(f"dataset.synthetic: {exc}") from None
        try:
            if root.exists() and not any(root.iterdir()):
                root.rmdir()
            os.replace(tmp / "d", root)
            print(f"generated {spec.videos} videos into {root}")
        except OSError:
            if not _complete(root):  # someone else won the race, or a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
