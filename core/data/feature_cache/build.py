"""Building a feature cache: once, under a lock, never seen half-written.

Builders hold ``<root>/<name>.lock`` (a ``filelock.FileLock``), write into a temporary sibling
folder and rename it into place, so concurrent trials never see a partial cache and never build
one twice. A cache that fails its checks is moved away and rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from core.data.config import FeatureCacheConfig
from core.data.datamodule import usable_workers
from core.data.feature_cache.key import (
    FORMAT,
    MANIFEST,
    CacheError,
    cache_dir,
    folder_name,
    key_inputs,
    stored_dtype,
    writable_cache_dir,
)
from core.data.feature_cache.reader import FeatureCache, open_cache
from core.data.layout import write_json
from core.hashing import file_digest
from core.text import Progress

COLUMN = "features"  # the one column of every shard


def _locked(path: Path) -> FileLock:
    """An exclusive lock on ``path`` between processes (and threads), waiting as long as it takes:
    a second builder of the same cache waits for the first, then finds the cache built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


class _Frames(torch.utils.data.Dataset):
    """Every frame of a split, in record order, decoded and normalised like training clips."""

    def __init__(self, records: Sequence[Any], dataset: Any,
                 normalization: tuple[Sequence[float], Sequence[float]]) -> None:
        from core.data.clips import pixel_stats

        self.paths = [p for r in records for p in r.frames]
        self.size, self.resize = dataset.img_size, dataset.resize
        self.mean, self.std = pixel_stats(*normalization)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from core.data.clips import load_frame, normalize_frames

        array, _ = load_frame(self.paths[i], self.size, self.resize)
        return normalize_frames(np.stack([array]), self.mean, self.std)[0]


class _ShardWriter:
    """Fills one split's shards in order: ``rows_per_shard`` rows each, the last one shorter."""

    def __init__(self, folder: Path, split: str, shape: tuple[int, int], rows_per_shard: int):
        self.folder, self.split, self.shape = folder, split, shape
        self.rows_per_shard = rows_per_shard
        self.buffer = np.empty((rows_per_shard, shape[0] * shape[1]), dtype=np.uint16)
        self.filled = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, bits: np.ndarray) -> None:
        while len(bits):
            take = min(len(bits), self.rows_per_shard - self.filled)
            self.buffer[self.filled:self.filled + take] = bits[:take]
            self.filled += take
            bits = bits[take:]
            if self.filled == self.rows_per_shard:
                self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if not self.filled:
            return
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        values = pa.array(self.buffer[:self.filled].reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, self.shape[0] * self.shape[1])
        batch = pa.record_batch([column], names=[COLUMN])
        path = self.folder / name
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
        self.shards.append({"file": name, "rows": self.filled, "bytes": path.stat().st_size,
                            "blake2b": file_digest(path)})
        self.filled = 0


def _build(folder: Path, encoder: torch.nn.Module, dataset: Any,
           splits: dict[str, Sequence[Any]], inputs: dict[str, Any],
           normalization: tuple[Sequence[float], Sequence[float]], shard_mb: float,
           device: torch.device, batch_frames: int) -> None:
    dtype = stored_dtype(inputs["dtype"])
    P, F = int(encoder.n_patches), int(encoder.feat_dim)
    rows_per_shard = max(1, int(shard_mb * 2**20) // (P * F * 2))
    manifest: dict[str, Any] = {"format": FORMAT, "complete": False, "key_inputs": inputs,
                                "shape": [P, F], "splits": {}, "created": time.time()}
    start = time.time()
    total = sum(len(r) for records in splits.values() for r in records)
    bar = Progress("building feature cache", total, "frames")
    for split, records in splits.items():
        loader = torch.utils.data.DataLoader(
            _Frames(records, dataset, normalization), batch_size=batch_frames,
            shuffle=False, num_workers=usable_workers(dataset.num_workers),
            pin_memory=device.type == "cuda")
        writer = _ShardWriter(folder, split, (P, F), rows_per_shard)
        with torch.inference_mode():
            for frames in loader:
                feats = encoder(frames.to(device, non_blocking=True)).to(dtype)
                bits = feats.reshape(len(frames), -1).view(torch.int16).cpu().numpy()
                writer.add(bits.view(np.uint16))
                bar.update(len(frames))
        writer.flush()
        manifest["splits"][split] = {"videos": [len(r) for r in records], "shards": writer.shards}
    bar.close()
    manifest.update(complete=True, seconds=round(time.time() - start, 2))
    write_json(folder / MANIFEST, manifest)


def _discard(path: Path) -> None:
    """Move a bad cache out of the way (atomic), then delete it."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.time_ns()}")
    with contextlib.suppress(OSError):
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def ensure_cache(encoder: Any, dataset: Any, splits: dict[str, Sequence[Any]],
                 cfg: FeatureCacheConfig, backbone: str, build: bool,
                 normalization: tuple[Sequence[float], Sequence[float]],
                 device: torch.device | None = None, batch_frames: int = 64,
                 log: Callable[[str], None] | None = None) -> FeatureCache | None:
    """Open this data's cache, (re)building it when ``build`` (or when it exists but is bad).

    ``dataset``: the resolved dataset config; ``splits``: split name -> its records;
    ``normalization``: the (mean, std) the run's loader uses. Returns ``None`` when there is no
    cache and ``build`` is false.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    inputs = key_inputs(encoder, dataset, splits, cfg.dtype, backbone, normalization)
    root = cache_dir(cfg)
    path = root / folder_name(inputs)

    damaged = False  # a cache that existed but failed its checks is rebuilt even in mode auto

    def try_open() -> FeatureCache | None:
        nonlocal damaged
        if not path.exists():
            return None
        try:
            return open_cache(path, inputs)
        except CacheError as exc:
            log(f"feature cache {path} is unusable ({exc}): rebuilding it")
            _discard(path)
            damaged = True
            return None

    cache = try_open()  # the common case takes no lock: a complete cache is immutable
    if cache is not None or not (build or damaged or _has_stale(root, path)):
        return cache
    writable_cache_dir(cfg)
    try:
        with _locked(root / f"{path.name}.lock"):
            cache = try_open()  # another process may have built it while we waited
            if cache is not None:
                return cache
            for stale in root.glob(f".{path.name}-*"):  # builds killed part-way
                shutil.rmtree(stale, ignore_errors=True)
            if not (build or damaged):
                return None
            device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=root))
            log(f"building feature cache {path} on {device} ...")
            previous = encoder.training, next(encoder.parameters()).device
            try:
                encoder.to(device).eval()
                _build(tmp, encoder, dataset, splits, inputs, normalization, cfg.shard_mb, device,
                       batch_frames)
                os.replace(tmp, path)
            finally:
                encoder.to(previous[1]).train(previous[0])
                shutil.rmtree(tmp, ignore_errors=True)
            cache = open_cache(path, inputs)
            cache.built = True
            log(f"built feature cache {cache.describe()} in {cache.manifest['seconds']:.1f} s")
            return cache
    except OSError as exc:
        raise CacheError(
            f"feature cache folder {root} is not writable ({exc.strerror}): set "
            "feature_cache.dir to a writable folder or feature_cache.mode=off") from None


def _has_stale(root: Path, path: Path) -> bool:
    return root.is_dir() and any(root.glob(f".{path.name}-*"))
