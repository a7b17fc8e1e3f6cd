"""The Lightning DataModule: records -> checked -> clip datasets -> seeded, pinned loaders."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from core.data.clips import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CachedClipDataset,
    ClipDataset,
    GatherFeatures,
    RandomClipSampler,
)
from core.data.config import DatasetConfig
from core.data.records import VideoRecord, check_records, read_index, scan_folders
from core.errors import ConfigError


def load_records(cfg: DatasetConfig, split: str) -> list[VideoRecord]:
    """The videos of one split, checked so that training cannot fail on them later."""
    if cfg.format == "folders":
        records = scan_folders(cfg.img_dir, split, cfg.mask_dir, cfg.val_fraction, cfg.val_split)
        where = f"{cfg.img_dir}"
    else:
        records = read_index(cfg.json_dir, split, cfg.img_dir, cfg.mask_dir)
        where = f"{cfg.json_dir}/{split}.json"
    check_records(records, cfg.ep_length, split, where, cfg.check_images)
    return records


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def usable_workers(asked: int, say: bool = False) -> int:
    """``dataset.num_workers``, at most the CPUs this process may run on (more loader processes
    than CPUs only compete with training; PyTorch warns about it). The batches are the same:
    clips are drawn in the main process and each is read the same way by any worker. ``say``:
    one line on stderr when the number is lowered."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    usable = min(asked, max(1, cpus or 1))
    if say and usable < asked:
        print(f"dataset.num_workers={asked}: using {usable} loader processes, as many as this "
              f"machine has CPUs", file=sys.stderr)
    return usable


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch: Lightning saves :meth:`state_dict` in checkpoints and
    hands it back on ``--continue``, so the batches after a resume are the ones a straight run
    would have seen (with :class:`RandomClipSampler`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip_batches = 0

    def __iter__(self):
        sampler = self.sampler
        skip, self._skip_batches = self._skip_batches, 0
        if skip and isinstance(sampler, RandomClipSampler):
            sampler.skip = skip * (self.batch_size or 1)
        self._yielded = skip
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, RandomClipSampler):
            self.sampler.set_epoch(int(state.get("epoch", 0)))
            self._skip_batches = int(state.get("batches", 0))


class VideoDataModule(pl.LightningDataModule):
    """Train / val loaders for a :class:`DatasetConfig` whose paths are already resolved.

    ``seed`` fixes the order and the random clips of every epoch; workers are seeded from it.
    ``normalization`` defaults to the config's ``mean``/``std``, else ImageNet statistics.
    """

    def __init__(
        self,
        cfg: DatasetConfig,
        seed: int = 0,
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        pin_memory: bool | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.features: Any = None  # a core.data.feature_cache.reader.FeatureCache: see use_features
        self.features_on_gpu = "auto"
        cfg.validate()
        self.cfg = cfg
        self.seed = seed
        mean, std = normalization or (IMAGENET_MEAN, IMAGENET_STD)
        self.mean = tuple(cfg.mean) if cfg.mean is not None else tuple(mean)
        self.std = tuple(cfg.std) if cfg.std is not None else tuple(std)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.batch_size = batch_size or cfg.batch_size
        self.train_set: ClipDataset | None = None
        self.val_set: ClipDataset | None = None

    def use_features(self, features: Any, on_gpu: str = "auto") -> None:
        """Read clips as rows of this feature cache from now on (same videos, same clips).

        ``on_gpu``: ``feature_cache.gpu`` (auto | on | off) for the training split."""
        self.features = features
        self.features_on_gpu = on_gpu
        for name in ("train_set", "val_set"):
            old = getattr(self, name)
            if old is not None:
                split = self.cfg.train_split if old.train else self.cfg.val_split
                setattr(self, name, self._dataset(split, old.train, old.records))

    def _dataset(self, split: str, train: bool, records: Any = None) -> ClipDataset:
        cfg = self.cfg
        records = load_records(cfg, split) if records is None else records
        args = (records, cfg.ep_length, cfg.img_size, self.mean, self.std)
        kwargs: dict[str, Any] = dict(train=train, val_clips=cfg.val_clips, resize=cfg.resize)
        if self.features is not None and split in self.features.splits:
            # validation still decodes its frames: the slot pictures show them
            return CachedClipDataset(*args, features=self.features.splits[split],
                                     with_video=not train, **kwargs)
        return ClipDataset(*args, hflip=cfg.hflip, **kwargs)

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _place_on_gpu(self, dataset: CachedClipDataset) -> bool:
        """Copy a cached split to the GPU when the config allows and it fits (once)."""
        from core.data.feature_cache.reader import fits_on_gpu, human_bytes

        split = dataset.features
        if split.device_tensor is not None:
            return True
        device = self._device()
        if self.features_on_gpu == "off" or device.type != "cuda":
            if self.features_on_gpu == "on":
                raise ConfigError("feature_cache.gpu=on but the run has no GPU: use auto or off")
            return False
        if self.features_on_gpu == "auto" and not fits_on_gpu(split.nbytes, device):
            print(f"feature cache: {split.split} split ({human_bytes(split.nbytes)}) does not "
                  "fit in half the free GPU memory: reading memory-mapped shards")
            return False
        split.to_device(device)
        print(f"feature cache: {split.split} split ({human_bytes(split.nbytes)}) is in GPU "
              "memory")
        return True

    def setup(self, stage: str | None = None) -> None:
        """Read and check both splits (fails fast, before any step, on bad data)."""
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._dataset(self.cfg.train_split, train=True)
        if self.val_set is None:
            self.val_set = self._dataset(self.cfg.val_split, train=False)

    def _loader(self, dataset: ClipDataset, batch_size: int, train: bool) -> DataLoader:
        workers = usable_workers(self.cfg.num_workers, say=train)
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        sampler = None
        if train:
            lengths = [len(r) for r in dataset.records]
            sampler = RandomClipSampler(lengths, self.cfg.ep_length, self.seed)
        loader_class = ResumableDataLoader if train else DataLoader
        collate, pin = None, self.pin_memory
        if isinstance(dataset, CachedClipDataset):
            collate = GatherFeatures(dataset.features)
            if train and self._place_on_gpu(dataset):
                workers, pin = 0, False  # batches are gathered on the device itself
        return loader_class(
            dataset,
            batch_size=batch_size if train else min(batch_size, len(dataset)),
            sampler=sampler,
            drop_last=train and len(dataset) >= batch_size * world,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin,
            persistent_workers=workers > 0,
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self._loader(self.train_set, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None
        return self._loader(self.val_set, self.cfg.val_batch_size or self.batch_size, train=False)
