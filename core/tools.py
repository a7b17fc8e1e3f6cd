"""Tools on a trained checkpoint, and the feature cache of a config, with ``core`` alone
(their commands are in ``core.cli``):

    slotsweep visualize --checkpoint CKPT [--data-dir D] [--output-dir O] [--clips 4]
    slotsweep cache-features CONFIG [key=value ...] [--data-dir D] [--verify]

``visualize`` reads the resolved config stored inside the checkpoint, so it needs nothing else
(``extract-features`` and the downstream tasks are in :mod:`core.downstream`).
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from core.names import RESOLVED_CONFIG_NAME, VISUALS_DIRNAME


def load_trained(checkpoint: str | Path) -> tuple[Any, Any]:
    """(config, SlotModule in eval mode) from a slotsweep checkpoint."""
    from core.config import load_config
    from core.training.callbacks import CONFIG_KEY
    from core.training.checkpoint import load_into, read_checkpoint
    from core.training.module import SlotModule

    ckpt = read_checkpoint(checkpoint)
    if CONFIG_KEY not in ckpt:
        raise ConfigError(f"checkpoint {checkpoint} carries no config: not written by slotsweep")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / RESOLVED_CONFIG_NAME
        path.write_text(ckpt[CONFIG_KEY])
        cfg = load_config(path)
    module = SlotModule(cfg)
    load_into(module, checkpoint)
    return cfg, module.eval()


def split_clips(cfg: Any, data_dir: str | Path | None, split: str,
                batch_size: int | None) -> tuple[list, Any, tuple]:
    """(records, loader of its fixed clips, (mean, std)) of a split of ``cfg``'s dataset;
    ``data_dir`` replaces the dataset root the checkpoint recorded."""
    from core.data.clips import ClipDataset
    from core.data.config import resolve_paths
    from core.data.datamodule import load_records
    from core.data.prepare import ensure_synthetic
    from core.models.encoder import normalization_of

    dataset = cfg.dataset
    if data_dir is not None:  # the checkpoint's paths are absolute: a new root replaces them
        dataset = replace(dataset, json_dir=None, img_dir=None, mask_dir=None)
    data_dir = ensure_synthetic(dataset, data_dir) or data_dir
    dataset = resolve_paths(dataset, data_dir)
    mean, std = normalization_of(cfg.model.encoder.backbone)
    records = load_records(dataset, split)
    clips = ClipDataset(records, dataset.ep_length, dataset.img_size, mean, std, train=False,
                        val_clips=dataset.val_clips, resize=dataset.resize)
    loader = torch.utils.data.DataLoader(clips, batch_size=batch_size or dataset.batch_size)
    return records, loader, (mean, std)


def predict_masks(checkpoint: str | Path, data_dir: str | Path | None = None, clips: int = 4,
                  split: str = "val") -> dict[str, Any]:
    """The trained model of ``checkpoint`` on the first ``clips`` clips of ``split``: ``video``
    (N, T, 3, H, W) normalised, ``masks`` (N, T, K, h, w) soft slot masks, ``true`` (N, T, H, W)
    object ids or None, ``features`` and ``reconstruction`` (N, T, h*w, F), ``mean``/``std``."""
    from core.names import MASKS_KEY

    cfg, module = load_trained(checkpoint)
    _, loader, (mean, std) = split_clips(cfg, data_dir, split, clips)
    batch = next(iter(loader))
    with torch.no_grad():
        out = module.model({"video": batch["video"]})
    return {"video": batch["video"][:clips], "masks": module._masks(out)[:clips],
            "true": batch[MASKS_KEY][:clips] if MASKS_KEY in batch else None,
            "features": out["features"][:clips], "reconstruction": out["reconstruction"][:clips],
            "mean": mean, "std": std, "config": cfg}


def visualize(checkpoint: str | Path, output_dir: str | Path | None = None,
              data_dir: str | Path | None = None, clips: int = 4, split: str = "val") -> list[Path]:
    """Frames, per-slot masks, overlay and feature reconstructions of the first ``clips``
    validation clips as PNGs (default folder: beside the checkpoint's run)."""
    import numpy as np
    from PIL import Image

    from core.training.callbacks import slot_grid

    pred = predict_masks(checkpoint, data_dir, clips, split)
    ckpt = Path(checkpoint)
    output = Path(output_dir) if output_dir else ckpt.parent.parent / VISUALS_DIRNAME / ckpt.stem
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(pred["video"].shape[0]):
        true = pred["true"][i] if pred["true"] is not None else None
        grid = slot_grid(pred["video"][i], pred["masks"][i], pred["mean"], pred["std"],
                         pred["features"][i], pred["reconstruction"][i], true)
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = output / f"clip{i:02d}.png"
        Image.fromarray(array).save(path)
        written.append(path)
    return written


def cache_features(cfg: Any, data_dir: str | Path | None = None, verify: bool = False,
                   log: Any = None, build: bool = True) -> Any:
    """``slotsweep cache-features``: build (or find and check) the frozen backbone's feature
    cache of ``cfg``'s dataset, both splits; returns the opened
    :class:`core.data.feature_cache.reader.FeatureCache`. ``verify`` re-hashes every shard.

    Builds whatever ``feature_cache.mode`` says (it only decides what training does);
    ``build=False`` only finds it (None when there is none).
    """
    from core.data.feature_cache.key import refusal, writable_cache_dir
    from core.data.feature_cache.reader import open_cache
    from core.models.build import build_encoder
    from core.train import feature_cache_for, make_datamodule

    why = refusal(cfg)
    if why is not None:
        raise ConfigError(f"no feature cache for this config: {why}")
    if build:
        writable_cache_dir(cfg.feature_cache)  # before generating any data
    cfg, datamodule = make_datamodule(cfg, data_dir)
    mode, gpu = ("build", cfg.feature_cache.gpu) if build else ("auto", "off")  # only looked up
    on = replace(cfg, feature_cache=replace(cfg.feature_cache, mode=mode, gpu=gpu))
    cache = feature_cache_for(on, build_encoder(cfg), datamodule, say=False, log=log)
    if cache is None:
        return None
    if verify:
        cache = open_cache(cache.root, cache.manifest["key_inputs"], full_check=True)
    return cache
