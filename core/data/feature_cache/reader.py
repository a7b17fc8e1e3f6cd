"""Opening and checking a feature cache, and reading its features.

Readers check every shard (size, Arrow schema, rows; blake2b digests once per shard change,
remembered in ``verified.json``); :class:`~core.data.feature_cache.key.CacheError` names what is
wrong. Shards are memory-mapped; a split that fits in GPU memory is copied there once and batches
are gathered on the device.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.data.feature_cache.key import FORMAT, MANIFEST, CacheError, stored_dtype
from core.data.layout import write_json
from core.hashing import file_digest

VERIFIED = "verified.json"  # in the cache folder: shard -> [size, mtime] when last digested
GPU_FRACTION = 0.5  # a split goes to the GPU when it needs at most this share of free memory


def _open_shard(path: Path, rows: int, width: int) -> np.ndarray:
    """Memory-map one shard as a (rows, width) uint16 array (read-only, zero-copy)."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        if reader.num_record_batches != 1:
            raise CacheError(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        column = batch.column(0)
        if batch.num_rows != rows or column.type != pa.list_(pa.uint16(), width):
            raise CacheError(f"{batch.num_rows} rows of {column.type}, expected {rows} rows of "
                             f"{width} uint16")
        values = column.values
        data = values.buffers()[1]
        return np.frombuffer(data, dtype=np.uint16, count=rows * width,
                             offset=values.offset * 2).reshape(rows, width)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise CacheError(f"{type(exc).__name__}: {str(exc)[:120]}") from None


class SplitFeatures:
    """The cached features of one split: ``rows(video, start, n)`` and ``gather(rows)``.

    Opens its shards lazily in each process (DataLoader workers map them themselves).
    """

    def __init__(self, root: Path, split: str, meta: dict[str, Any], dtype: torch.dtype,
                 shape: tuple[int, int]) -> None:
        self.root, self.split, self.dtype, self.shape = root, split, dtype, shape
        self.shards = meta["shards"]
        self.lengths = [int(n) for n in meta["videos"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum([s["rows"] for s in self.shards])])
        self.frames = int(self.offsets[-1])
        self.device_tensor: torch.Tensor | None = None
        self._arrays: list[np.ndarray] | None = None
        self._pid = -1

    @property
    def nbytes(self) -> int:
        return self.frames * self.shape[0] * self.shape[1] * 2

    def __getstate__(self) -> dict[str, Any]:  # workers re-map the shards; no GPU copy
        state = dict(self.__dict__)
        state.update(_arrays=None, _pid=-1, device_tensor=None)
        return state

    def _maps(self) -> list[np.ndarray]:
        if self._arrays is None or self._pid != os.getpid():
            width = self.shape[0] * self.shape[1]
            self._arrays = [_open_shard(self.root / s["file"], s["rows"], width)
                            for s in self.shards]
            self._pid = os.getpid()
        return self._arrays

    def _host_rows(self, first: int, count: int) -> torch.Tensor:
        parts = []
        maps = self._maps()
        row, end = first, first + count
        while row < end:
            shard = int(np.searchsorted(self.starts, row, side="right")) - 1
            local = row - int(self.starts[shard])
            take = min(end - row, int(self.starts[shard + 1]) - row)
            parts.append(maps[shard][local:local + take])
            row += take
        array = parts[0] if len(parts) == 1 else np.concatenate(parts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memory map: we never write to it
            tensor = torch.from_numpy(array)
        return tensor.view(self.dtype).view(count, *self.shape)  # a view: callers copy

    def clip_rows(self, video: int, start: int, length: int) -> torch.Tensor:
        """Global row numbers of ``length`` frames of ``video`` from ``start``."""
        return torch.arange(length) + int(self.offsets[video]) + start

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Features of ``rows`` (B, T) -> (B, T, P, F); on the GPU when the split lives there."""
        if self.device_tensor is not None:
            return self.device_tensor[rows.to(self.device_tensor.device, non_blocking=True)]
        # each clip is a run of consecutive rows (clip_rows): one slice of the memory map
        return torch.stack([self._host_rows(int(r[0]), len(r)) for r in rows])

    def to_device(self, device: torch.device) -> None:
        """Copy the whole split into one tensor on ``device`` (shard by shard, pinned)."""
        out = torch.empty((self.frames, *self.shape), dtype=self.dtype, device=device)
        for i, _ in enumerate(self.shards):
            lo, hi = int(self.starts[i]), int(self.starts[i + 1])
            host = self._host_rows(lo, hi - lo)
            out[lo:hi].copy_(host.pin_memory() if device.type == "cuda" else host)
        self.device_tensor = out


@dataclass
class FeatureCache:
    """An opened, checked cache: its folder, manifest and per-split features."""

    root: Path
    manifest: dict[str, Any]
    splits: dict[str, SplitFeatures]
    built: bool = False  # built by the ensure_cache call that returned it

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.splits.values())

    def describe(self) -> str:
        frames = sum(s.frames for s in self.splits.values())
        return f"{self.root} ({frames} frames, {human_bytes(self.nbytes)})"


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _verify(root: Path, manifest: dict[str, Any], full: bool) -> None:
    """Check every shard; re-digest those whose size or mtime differ from ``verified.json``
    (all of them when ``full``)."""
    try:
        stamp = json.loads((root / VERIFIED).read_text())
    except (OSError, ValueError):
        stamp = {}
    fresh = {}
    width = manifest["shape"][0] * manifest["shape"][1]
    for split, meta in manifest["splits"].items():
        if sum(meta["videos"]) != sum(s["rows"] for s in meta["shards"]):
            raise CacheError(f"split {split}: video frame counts do not add up to the shard rows")
        for shard in meta["shards"]:
            path = root / shard["file"]
            try:
                st = path.stat()
            except OSError:
                raise CacheError(f"shard {shard['file']} is missing") from None
            if st.st_size != shard["bytes"]:
                raise CacheError(f"shard {shard['file']} has {st.st_size} bytes, the manifest "
                                 f"says {shard['bytes']}")
            _open_shard(path, shard["rows"], width)
            seen = [st.st_size, st.st_mtime_ns]
            changed = full or stamp.get(shard["file"]) != seen
            if changed and file_digest(path) != shard["blake2b"]:
                raise CacheError(f"shard {shard['file']} does not match its digest")
            fresh[shard["file"]] = seen
    if fresh != stamp:
        with contextlib.suppress(OSError):  # a read-only shared cache is checked every time
            write_json(root / VERIFIED, fresh)


def open_cache(root: str | Path, inputs: dict[str, Any] | None = None,
               full_check: bool = False) -> FeatureCache:
    """Open and check the cache in ``root``; :class:`CacheError` names what is wrong.

    ``inputs``: the expected key inputs (refuses a cache built for something else).
    """
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise CacheError(f"{root} has no {MANIFEST} (an unfinished build)") from None
    except (OSError, ValueError) as exc:
        raise CacheError(f"{root}/{MANIFEST} cannot be read ({exc})") from None
    if manifest.get("format") != FORMAT or not manifest.get("complete"):
        raise CacheError(f"{root} is not a complete {FORMAT} cache")
    if inputs is not None and manifest.get("key_inputs") != inputs:
        raise CacheError(f"{root} was built for other data or another backbone")
    try:
        _verify(root, manifest, full_check)
        dtype = stored_dtype(manifest["key_inputs"]["dtype"])
        shape = (int(manifest["shape"][0]), int(manifest["shape"][1]))
        splits = {name: SplitFeatures(root, name, meta, dtype, shape)
                  for name, meta in manifest["splits"].items()}
    except (KeyError, TypeError, IndexError) as exc:
        raise CacheError(f"{root}/{MANIFEST} is malformed ({type(exc).__name__}: {exc})") from None
    return FeatureCache(root, manifest, splits)


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """True when ``nbytes`` take at most :data:`GPU_FRACTION` of the device's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= GPU_FRACTION * free
