"""The frozen backbone's features of a whole dataset, computed once and shared by every run.

A cache is a folder ``<root>/<backbone>-<img_size>px-<key>/`` holding, per split, Arrow IPC
shards (one record batch of ``rows`` frames each, a FixedSizeList<uint16> column: the bf16 or
fp16 bits of the (P, F) features) and ``manifest.json``: the key's inputs, every video's frame
count, every shard's rows, bytes and blake2b digest. The key is a digest of everything that
determines the features: backbone name, weights hash, layer, image size, resize mode, mean/std,
storage dtype and the frame files of each split (path and byte size).

Builders hold ``<root>/<name>.lock`` (a ``filelock.FileLock``), write into a temporary sibling
folder and rename it into place, so concurrent trials never see a partial cache and never build
one twice. Readers check every shard (size, Arrow schema, rows; digests once per shard change,
remembered in ``verified.json``); a cache that fails any check is moved away and rebuilt, never
read.
Shards are memory-mapped; a split that fits in GPU memory is copied there once and batches are
gathered on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock

from core.data.config import FeatureCacheConfig
from core.errors import SlotsweepError
from core.hashing import json_digest
from core.names import FEATURE_CACHE_ENV

FORMAT = "slotsweep.features/v1"
DIR_ENV = FEATURE_CACHE_ENV
MANIFEST = "manifest.json"
VERIFIED = "verified.json"
COLUMN = "features"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GPU_FRACTION = 0.5  # a split goes to the GPU when it needs at most this share of free memory


class CacheError(SlotsweepError):
    """A cache folder that is incomplete, corrupt or not the one asked for."""


def cache_dir(cfg: FeatureCacheConfig) -> Path:
    """Where caches of this config live: ``feature_cache.dir``, else ``$SLOTSWEEP_FEATURE_CACHE``,
    else ``$SLOTSWEEP_CACHE/features`` (``~/.cache/slotsweep/features``)."""
    if cfg.dir:
        return Path(cfg.dir).expanduser().resolve()
    if os.environ.get(DIR_ENV):
        return Path(os.environ[DIR_ENV]).expanduser().resolve()
    from core.data.prepare import cache_root

    return cache_root() / "features"


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


# ---------------------------------------------------------------------------------------- key
def _frame_list_digest(records: Sequence[Any]) -> str:
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
    digest = json_digest(inputs, 16)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in inputs["backbone"])
    return f"{name}-{inputs['img_size']}px-{digest}"


# ------------------------------------------------------------------------------------ reading
def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


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
            if changed and _file_digest(path) != shard["blake2b"]:
                raise CacheError(f"shard {shard['file']} does not match its digest")
            fresh[shard["file"]] = seen
    if fresh != stamp:
        with contextlib.suppress(OSError):  # a read-only shared cache is checked every time
            _write_json(root / VERIFIED, fresh)


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
        dtype = DTYPES[manifest["key_inputs"]["dtype"]]
        shape = (int(manifest["shape"][0]), int(manifest["shape"][1]))
        splits = {name: SplitFeatures(root, name, meta, dtype, shape)
                  for name, meta in manifest["splits"].items()}
    except (KeyError, TypeError, IndexError) as exc:
        raise CacheError(f"{root}/{MANIFEST} is malformed ({type(exc).__name__}: {exc})") from None
    return FeatureCache(root, manifest, splits)


# ----------------------------------------------------------------------------------- building
def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


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
                            "blake2b": _file_digest(path)})
        self.filled = 0


def _build(folder: Path, encoder: torch.nn.Module, dataset: Any,
           splits: dict[str, Sequence[Any]], inputs: dict[str, Any],
           normalization: tuple[Sequence[float], Sequence[float]], shard_mb: float,
           device: torch.device, batch_frames: int, log: Callable[[str], None]) -> None:
    dtype = DTYPES[inputs["dtype"]]
    P, F = int(encoder.n_patches), int(encoder.feat_dim)
    rows_per_shard = max(1, int(shard_mb * 2**20) // (P * F * 2))
    manifest: dict[str, Any] = {"format": FORMAT, "complete": False, "key_inputs": inputs,
                                "shape": [P, F], "splits": {}, "created": time.time()}
    start, done = time.time(), 0
    total = sum(len(r) for records in splits.values() for r in records)
    for split, records in splits.items():
        loader = torch.utils.data.DataLoader(
            _Frames(records, dataset, normalization), batch_size=batch_frames,
            shuffle=False, num_workers=dataset.num_workers, pin_memory=device.type == "cuda")
        writer = _ShardWriter(folder, split, (P, F), rows_per_shard)
        with torch.inference_mode():
            for frames in loader:
                feats = encoder(frames.to(device, non_blocking=True)).to(dtype)
                bits = feats.reshape(len(frames), -1).view(torch.int16).cpu().numpy()
                writer.add(bits.view(np.uint16))
                done += len(frames)
                if done % (batch_frames * 50) < len(frames):
                    log(f"  {done}/{total} frames ({done / (time.time() - start):.0f}/s)")
        writer.flush()
        manifest["splits"][split] = {"videos": [len(r) for r in records], "shards": writer.shards}
    manifest.update(complete=True, seconds=round(time.time() - start, 2))
    _write_json(folder / MANIFEST, manifest)


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
                       batch_frames, log)
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


def fits_on_gpu(nbytes: int, device: torch.device) -> bool:
    """True when ``nbytes`` take at most :data:`GPU_FRACTION` of the device's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= GPU_FRACTION * free
