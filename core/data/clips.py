"""Clips of ``ep_length`` frames from :class:`VideoRecord` lists, resized and normalised.

Training draws one random clip per video per epoch: :class:`RandomClipSampler` picks the video
order and each clip's first frame from ``(seed, epoch)`` alone, so a seeded run repeats exactly
whatever the number of workers, and epoch ``e`` after a resume sees the clips it would have seen.
Validation uses a fixed list of clips (every non-overlapping clip, or the first of each video).
A sample is a dict: ``video`` (T, 3, S, S) float32 normalised, ``masks`` (T, S, S) int64
instance ids (validation, when masks exist), ``video_index``, ``start``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler, default_collate

from core.data.records import VideoRecord
from core.errors import DataError
from core.names import FEATURES_KEY, MASKS_KEY, VIDEO_KEY

INDEX_KEY = "video_index"
START_KEY = "start"
ROWS_KEY = "rows"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _crop_box(width: int, height: int, mode: str) -> tuple[int, int, int, int]:
    """Centre square of the frame (``crop``) or the whole frame (``stretch``)."""
    if mode == "stretch":
        return 0, 0, width, height
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def load_frame(path, size: int, resize: str = "crop") -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image file to a (size, size, 3) uint8 array (bicubic, antialiased).

    Also returns the file's own (width, height), against which its mask is checked.
    """
    try:
        with Image.open(path) as image:
            original = image.size
            if image.format == "JPEG" and min(image.size) >= 2 * size:
                image.draft("RGB", (size, size))  # let libjpeg decode at a reduced scale
            image = image.convert("RGB")
            box = _crop_box(image.width, image.height, resize)  # of the (drafted) decode
            image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
            return np.asarray(image), original
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"frame {path} cannot be read ({exc}): replace or remove it") from None


def load_mask(path, size: int, frame_size: tuple[int, int] | None, resize: str = "crop"):
    """Decode a PNG id map to a (size, size) int64 array (nearest neighbour)."""
    try:
        with Image.open(path) as image:
            if frame_size is not None and image.size != frame_size:
                raise DataError(
                    f"mask {path} is {image.size[0]}x{image.size[1]} but its frame is "
                    f"{frame_size[0]}x{frame_size[1]}: masks must match their frames"
                )
            if image.mode not in ("L", "P", "I", "I;16"):
                image = image.convert("L")
            box = _crop_box(image.width, image.height, resize)
            image = image.resize((size, size), Image.Resampling.NEAREST, box=box)
            return np.asarray(image).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"mask {path} cannot be read ({exc}): replace or remove it") from None


def normalize_frames(frames: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(T, S, S, 3) uint8 -> (T, 3, S, S) float32 ``(x - mean) / std`` with ``mean``/``std``
    of shape (1, 3, 1, 1) in 0-255 units: what the backbone sees, for clips and the cache."""
    return (torch.from_numpy(frames).permute(0, 3, 1, 2).float() - mean) / std


def pixel_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean``, ``std`` (0-1 units) as (1, 3, 1, 1) tensors in 0-255 units."""
    scale = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) * 255.0  # noqa: E731
    return scale(mean), scale(std)


class RandomClipSampler(Sampler):
    """Yields ``(video_index, start)`` keys: videos shuffled, one random clip each, per epoch.

    Everything is drawn from a generator seeded with ``(seed, epoch)``; Lightning calls
    :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, lengths: Sequence[int], ep_length: int, seed: int = 0) -> None:
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.ep_length = ep_length
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # items of this epoch already consumed before a resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator)
        highs = (self.lengths[order] - self.ep_length + 1).double()
        starts = (torch.rand(len(order), generator=generator, dtype=torch.float64) * highs).long()
        skip, self.skip = self.skip, 0
        return iter(list(zip(order.tolist(), starts.tolist(), strict=True))[skip:])


class ClipDataset(Dataset):
    """Clips of ``ep_length`` frames.

    ``train=True``: index ``i`` is a random clip of video ``i`` (from the global torch RNG); pass
    ``(video_index, start)`` keys from :class:`RandomClipSampler` for seeded runs.
    ``train=False``: index ``i`` is the ``i``-th fixed validation clip.
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        ep_length: int,
        img_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train: bool = True,
        val_clips: str = "all",
        resize: str = "crop",
        load_masks: bool | None = None,
        hflip: float = 0.0,
    ) -> None:
        self.records = list(records)
        self.hflip = hflip if train else 0.0
        self.ep_length = ep_length
        self.img_size = img_size
        self.resize = resize
        self.train = train
        self.mean, self.std = pixel_stats(mean, std)
        has_masks = bool(self.records) and all(r.masks is not None for r in self.records)
        self.load_masks = (not train and has_masks) if load_masks is None else load_masks
        if self.load_masks and not has_masks:
            raise DataError("masks were requested but not every video has masks")
        if train:
            self.clips = [(i, -1) for i in range(len(self.records))]
        else:
            self.clips = []
            for i, record in enumerate(self.records):
                n_clips = len(record) // ep_length if val_clips == "all" else 1
                self.clips += [(i, k * ep_length) for k in range(n_clips)]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | int]:
        video_index, start = index if isinstance(index, tuple) else self.clips[index]
        record = self.records[video_index]
        if start < 0:
            high = len(record) - self.ep_length + 1
            start = int(torch.randint(high, ()).item())
        sample: dict[str, torch.Tensor | int] = {INDEX_KEY: video_index, START_KEY: start}
        sizes = self._add_inputs(sample, video_index, start)
        if self.load_masks:
            assert record.masks is not None
            window = range(start, start + self.ep_length)
            masks = [
                load_mask(record.masks[t], self.img_size, sizes[k] if sizes else None, self.resize)
                for k, t in enumerate(window)
            ]
            sample[MASKS_KEY] = torch.from_numpy(np.stack(masks))
        return sample

    def load_video(self, video_index: int, start: int) -> tuple[torch.Tensor, list]:
        """Frames ``start .. start + ep_length`` of a video, (T, 3, S, S) normalised, and each
        frame file's own (width, height)."""
        record = self.records[video_index]
        window = range(start, start + self.ep_length)
        decoded = [load_frame(record.frames[t], self.img_size, self.resize) for t in window]
        frames = np.stack([array for array, _ in decoded])
        return normalize_frames(frames, self.mean, self.std), [size for _, size in decoded]

    def _add_inputs(self, sample: dict, video_index: int, start: int) -> list | None:
        """Put the model's input into ``sample``; returns the frame sizes masks are checked
        against (``None``: not known)."""
        video, sizes = self.load_video(video_index, start)
        if self.hflip and float(torch.rand(())) < self.hflip:
            video = video.flip(-1)
        sample[VIDEO_KEY] = video
        return sizes


class CachedClipDataset(ClipDataset):
    """Clips whose inputs are rows of a feature cache (:mod:`core.data.feature_cache`).

    A sample holds ``rows`` (T,) instead of ``video``; :class:`GatherFeatures` (the loader's
    collate function) turns a batch of rows into ``features`` (B, T, P, F). ``with_video``
    also decodes the frames (validation: the slot pictures need them).
    """

    def __init__(self, *args, features=None, with_video: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if features is None or features.lengths != [len(r) for r in self.records]:
            raise DataError("the feature cache does not match this split's videos: rebuild it")
        self.features = features
        self.with_video = with_video

    def _add_inputs(self, sample: dict, video_index: int, start: int) -> list | None:
        sample[ROWS_KEY] = self.features.clip_rows(video_index, start, self.ep_length)
        if self.with_video:
            video, sizes = self.load_video(video_index, start)
            sample[VIDEO_KEY] = video
            return sizes
        return None


class GatherFeatures:
    """Collate function: the default collation, then ``rows`` -> ``features`` from the cache
    (in the loader worker for memory-mapped shards, on the GPU for a split that lives there)."""

    def __init__(self, features) -> None:
        self.features = features

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        batch[FEATURES_KEY] = self.features.gather(batch.pop(ROWS_KEY))
        return batch
