"""Seeded, pure-numpy generator of moving-object videos with instance masks.

Each video shows a few flat-coloured shapes (disks, squares, triangles, optionally digit sprites)
moving at constant velocity, bouncing off the frame border and occluding each other by a fixed
depth order. Masks hold persistent instance ids (1..n, 0 = background) and agree exactly with the
frames: every pixel of id ``k`` has object ``k``'s colour. ``write_synthetic_dataset`` writes the
layout described in :mod:`core.data.layout`.

One file of about 375 lines on purpose: the spec, the renderer and the writer are one job (what
a generated dataset is), and every part reads the same constants.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.data import layout

GENERATOR_NAME = "slotsweep.synthetic"
# 2: every video has a ``label`` (:func:`video_label`); cached datasets of version 1 lack it.
GENERATOR_VERSION = 2
BASE_SHAPES = ("disk", "square", "triangle")
DIGIT_SHAPES = tuple(f"digit{d}" for d in range(10))
KNOWN_SHAPES = BASE_SHAPES + DIGIT_SHAPES
MAX_OBJECTS = 12
PLAIN_BACKGROUND = (40, 40, 40)
# Clearly distinct saturated colours; objects sample them without replacement.
PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (255, 105, 180), (0, 128, 128),
    (255, 255, 255),
)
COLOR_NAMES = ("red", "green", "yellow", "blue", "orange", "purple", "cyan", "magenta", "lime",
               "pink", "teal", "white")
# 5x7 bitmap font, rows top to bottom, "1" = ink.
_FONT = {
    0: "01110 10001 10011 10101 11001 10001 01110",
    1: "00100 01100 00100 00100 00100 00100 01110",
    2: "01110 10001 00001 00010 00100 01000 11111",
    3: "11110 00001 00001 01110 00001 00001 11110",
    4: "00010 00110 01010 10010 11111 00010 00010",
    5: "11111 10000 11110 00001 00001 10001 01110",
    6: "00110 01000 10000 11110 10001 10001 01110",
    7: "11111 00001 00010 00100 01000 01000 01000",
    8: "01110 10001 10001 01110 10001 10001 01110",
    9: "01110 10001 10001 01111 00001 00010 01100",
}
DIGIT_BITMAPS = {
    d: np.array([[c == "1" for c in row] for row in rows.split()], dtype=bool)
    for d, rows in _FONT.items()
}


@dataclass
class SyntheticSpec:
    """What the generated videos look like.

    ``min_size``/``max_size`` are fractions of ``size``; an object's size is its half-extent in
    pixels (disk radius, half side of a square, circumradius of a triangle, half height of a
    digit). ``max_speed`` is in pixels per frame; ``None`` means ``0.06 * size``.
    ``colors``: ``None`` gives every object of a video its own palette colour; ``n`` draws each
    object's colour from the first ``n`` palette colours with replacement, so objects of one
    video may share a colour and only their place tells them apart (clustering colours then
    merges objects; finding objects does not).
    """

    n_frames: int = 8
    size: int = 64
    min_objects: int = 2
    max_objects: int = 6
    shapes: Sequence[str] = BASE_SHAPES
    digits: bool = False
    textured_background: bool = False
    min_size: float = 0.12
    max_size: float = 0.3
    max_speed: float | None = None
    colors: int | None = None

    @classmethod
    def from_options(cls, options: Any) -> SyntheticSpec:
        """The spec named by ``options``' attributes: the ``make-data`` command's flags or a
        config's ``dataset.synthetic`` block (both spell the frame count ``frames``)."""
        names = ("size", "min_objects", "max_objects", "digits", "textured_background",
                 "min_size", "max_size", "colors", "max_speed")
        return cls(n_frames=options.frames, **{n: getattr(options, n) for n in names})

    def __post_init__(self) -> None:
        if isinstance(self.shapes, str):
            raise ValueError(f"shapes must be a sequence of names, not the string {self.shapes!r}")
        self.shapes = tuple(self.shapes)
        if self.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not self.shapes:
            raise ValueError("shapes must not be empty")
        unknown = [s for s in self.shapes if s not in KNOWN_SHAPES]
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(KNOWN_SHAPES)}")
        if not 0 < self.min_size <= self.max_size <= 0.45:
            raise ValueError(
                "need 0 < min_size <= max_size <= 0.45 (fractions of size), "
                f"got min_size={self.min_size}, max_size={self.max_size}"
            )
        if self.min_size == self.max_size and self.max_objects > 1:
            raise ValueError("min_size must be < max_size so objects can get distinct sizes")
        if self.colors is not None and not 1 <= self.colors <= len(PALETTE):
            raise ValueError(f"colors must be in 1..{len(PALETTE)} (or unset), got {self.colors}")
        if self.max_speed is not None and self.max_speed < 0:
            raise ValueError(f"max_speed must be >= 0, got {self.max_speed}")

    @property
    def speed_px(self) -> float:
        """Maximum speed in pixels per frame (``max_speed`` resolved)."""
        return 0.06 * self.size if self.max_speed is None else float(self.max_speed)


@dataclass
class Video:
    """One generated video.

    ``frames``: uint8 (T, H, W, 3); ``masks``: uint8 (T, H, W) with ids 1..n (0 = background);
    ``objects``: one dict per object (id, shape, color, size, depth, position, velocity: the
    initial (x, y) centre and velocity); ``positions``/``velocities``: float (T, n, 2) per frame.
    """

    frames: np.ndarray
    masks: np.ndarray
    objects: list[dict[str, Any]]
    positions: np.ndarray = field(repr=False)
    velocities: np.ndarray = field(repr=False)


def rasterize(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` centred at (cx, cy) with half-extent ``r``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xs - cx, ys - cy
    if shape == "disk":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= r
    if shape == "triangle":  # upright equilateral, circumradius r: three half-planes at r/2
        s = np.sqrt(3.0) / 2.0
        return (dy <= r / 2) & (-s * dx - dy / 2 <= r / 2) & (s * dx - dy / 2 <= r / 2)
    if shape in DIGIT_SHAPES:
        bitmap = DIGIT_BITMAPS[int(shape[5:])]
        h, w = 2.0 * r, 2.0 * r * 5.0 / 7.0
        u = np.floor((dx + w / 2) / w * 5.0).astype(np.int64)
        v = np.floor((dy + h / 2) / h * 7.0).astype(np.int64)
        inside = (u >= 0) & (u < 5) & (v >= 0) & (v < 7)
        out = np.zeros((size, size), dtype=bool)
        out[inside] = bitmap[v[inside], u[inside]]
        return out
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(KNOWN_SHAPES)}")


def make_background(rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """uint8 (H, W, 3) background: plain dark grey, or a muted texture drawn from ``rng``."""
    n = spec.size
    if not spec.textured_background:
        return np.full((n, n, 3), PLAIN_BACKGROUND, np.uint8)
    base = rng.uniform(50, 100, size=3)
    tint = rng.uniform(-15, 15, size=3)
    kind = rng.integers(3)
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float64)
    if kind == 0:  # smooth low-frequency noise: bilinear upsampling of a coarse random grid
        k = int(rng.integers(3, 6))
        grid = rng.uniform(-1, 1, size=(k + 1, k + 1, 3))
        gx, gy = xs * k / (n - 1), ys * k / (n - 1)
        x0 = np.minimum(np.floor(gx).astype(int), k - 1)
        y0 = np.minimum(np.floor(gy).astype(int), k - 1)
        fx, fy = (gx - x0)[..., None], (gy - y0)[..., None]
        top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
        bot = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
        img = base + 25.0 * (top * (1 - fy) + bot * fy)
    else:
        period = rng.uniform(0.1, 0.25) * n
        if kind == 1:  # stripes at a random angle
            a = rng.uniform(0, np.pi)
            t = np.floor((xs * np.cos(a) + ys * np.sin(a)) / period)
        else:  # checkerboard
            t = np.floor(xs / period) + np.floor(ys / period)
        img = base + np.where((t % 2 == 0)[..., None], tint, -tint)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_frame(
    objects: Sequence[dict[str, Any]],
    positions: np.ndarray,
    spec: SyntheticSpec,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``objects`` at ``positions`` ((n, 2) x, y centres) in increasing depth order.

    Returns (frame uint8 (H, W, 3), mask uint8 (H, W)); later-drawn (higher depth) objects
    overwrite earlier ones in both. ``background`` defaults to the plain dark grey.
    """
    n = spec.size
    bg = np.full((n, n, 3), PLAIN_BACKGROUND, np.uint8) if background is None else background
    frame = bg.copy()
    mask = np.zeros((n, n), dtype=np.uint8)
    for i in sorted(range(len(objects)), key=lambda j: objects[j]["depth"]):
        obj = objects[i]
        m = rasterize(obj["shape"], positions[i][0], positions[i][1], obj["size"], n)
        frame[m] = obj["color"]
        mask[m] = obj["id"]
    return frame, mask


def _bounce(p: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    """Advance p by v in place, reflecting position and velocity at [lo, hi] per coordinate."""
    p += v
    for _ in range(1000):
        below, above = p < lo, p > hi
        if not (below.any() or above.any()):
            return
        p[below] = 2 * lo[below] - p[below]
        p[above] = 2 * hi[above] - p[above]
        v[below | above] *= -1
    np.clip(p, lo, hi, out=p)


def generate_video(rng: np.random.Generator, spec: SyntheticSpec) -> Video:
    """Generate one video from ``rng`` (same rng state and spec -> identical output)."""
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    families = list(spec.shapes) + (["digit"] if spec.digits else [])
    if spec.colors is None:
        colours = rng.choice(len(PALETTE), size=n_obj, replace=False)
    else:
        colours = rng.choice(spec.colors, size=n_obj, replace=True)
    size_grid = np.linspace(spec.min_size * spec.size, spec.max_size * spec.size, 64)
    sizes = size_grid[rng.choice(len(size_grid), size=n_obj, replace=False)]
    depths = rng.permutation(n_obj)
    lo = np.repeat(sizes[:, None], 2, axis=1)
    hi = (spec.size - 1) - lo
    pos = lo + rng.uniform(size=(n_obj, 2)) * (hi - lo)
    angle = rng.uniform(0, 2 * np.pi, size=n_obj)
    speed = spec.speed_px * rng.uniform(0.3, 1.0, size=n_obj)
    vel = np.stack([speed * np.cos(angle), speed * np.sin(angle)], axis=1)
    objects = []
    for i in range(n_obj):
        shape = families[int(rng.integers(len(families)))]
        if shape == "digit":
            shape = DIGIT_SHAPES[int(rng.integers(10))]
        objects.append({
            "id": i + 1,
            "shape": shape,
            "color": [int(c) for c in PALETTE[int(colours[i])]],
            "size": float(sizes[i]),
            "depth": int(depths[i]),
            "position": [float(pos[i, 0]), float(pos[i, 1])],
            "velocity": [float(vel[i, 0]), float(vel[i, 1])],
        })
    background = make_background(rng, spec)
    T, n = spec.n_frames, spec.size
    frames = np.empty((T, n, n, 3), np.uint8)
    masks = np.empty((T, n, n), np.uint8)
    positions = np.empty((T, n_obj, 2))
    velocities = np.empty((T, n_obj, 2))
    for t in range(T):
        if t > 0:
            _bounce(pos, vel, lo, hi)
        positions[t], velocities[t] = pos, vel
        frames[t], masks[t] = render_frame(objects, pos, spec, background)
    return Video(frames, masks, objects, positions, velocities)


def video_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of video ``index`` in a dataset with ``seed`` (independent of its size)."""
    return np.random.default_rng([seed, index])


def video_label(objects: Sequence[dict[str, Any]]) -> str:
    """A generated video's category: colour and shape family of its largest object, e.g.
    ``"red disk"`` ("digit" for any digit): up to 36 categories (48 with digits) that only the
    main object carries, as a labelled frame of SAYCam names the object in view."""
    largest = max(objects, key=lambda obj: obj["size"])
    family = "digit" if largest["shape"] in DIGIT_SHAPES else largest["shape"]
    return f"{COLOR_NAMES[PALETTE.index(tuple(largest['color']))]} {family}"


def is_synthetic_dataset(out: Path) -> bool:
    """Whether ``out`` holds a dataset this generator wrote (its ``dataset.json`` says so)."""
    try:
        meta = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME


def write_synthetic_dataset(
    out: str | Path,
    n_videos: int,
    spec: SyntheticSpec,
    seed: int,
    val_fraction: float = 0.25,
    image_format: str = "jpg",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Generate ``n_videos`` videos and write them in the :mod:`core.data.layout` layout.

    The last ``round(n_videos * val_fraction)`` videos (at least 1 when ``n_videos >= 2`` and
    ``val_fraction > 0``; at most ``n_videos - 1``) form the val split. Video ``i`` depends only
    on (seed, i). ``out`` must be empty, missing, or a previous synthetic dataset (overwritten).
    Returns a summary dict (n_train, n_val, n_frames, size, out).
    """
    if int(n_videos) != n_videos or n_videos < 1:
        raise ValueError(f"n_videos must be an integer >= 1, got {n_videos}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; pick an empty directory for the dataset")
    if out.is_dir() and any(out.iterdir()):
        if not is_synthetic_dataset(out):
            raise FileExistsError(
                f"{out} is not empty and not a synthetic dataset; pick an empty directory"
            )
        for name in (layout.FRAMES_DIRNAME, layout.MASKS_DIRNAME, layout.JSON_DIRNAME):
            shutil.rmtree(out / name, ignore_errors=True)
    n_videos = int(n_videos)
    n_val = round(n_videos * val_fraction)
    if val_fraction > 0 and n_videos >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n_videos - 1)
    n_train = n_videos - n_val
    meta: dict[str, Any] = {
        "generator": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "complete": False,
        "spec": {**asdict(spec), "shapes": list(spec.shapes), "max_speed": spec.speed_px},
        "seed": int(seed),
        "n_videos": n_videos,
        "n_train": n_train,
        "n_val": n_val,
        "val_fraction": val_fraction,
        "image_format": image_format,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))  # marks the dir as ours early
    from PIL import Image

    suffix = "." + image_format
    save_kw: dict[str, Any] = {"quality": 95, "subsampling": 0} if image_format == "jpg" else {}
    fdir, mdir = out / layout.FRAMES_DIRNAME, out / layout.MASKS_DIRNAME
    entries: list[dict[str, Any]] = []
    for i in range(n_videos):
        video = generate_video(video_rng(seed, i), spec)
        vid = f"video_{i:05d}"
        (fdir / vid).mkdir(parents=True, exist_ok=True)
        (mdir / vid).mkdir(parents=True, exist_ok=True)
        frames = [f"{vid}/{layout.frame_name(t, suffix)}" for t in range(spec.n_frames)]
        masks = [f"{vid}/{layout.frame_name(t, layout.MASK_SUFFIX)}" for t in range(spec.n_frames)]
        for t in range(spec.n_frames):
            Image.fromarray(video.frames[t]).save(fdir / frames[t], **save_kw)
            Image.fromarray(video.masks[t]).save(mdir / masks[t])
        entries.append({"id": vid, "frames": frames, "masks": masks, "height": spec.size,
                        "width": spec.size, "objects": video.objects,
                        "label": video_label(video.objects)})
        if progress is not None:
            progress(i + 1, n_videos)
    layout.write_index(out / layout.JSON_DIRNAME, layout.TRAIN_SPLIT, entries[:n_train])
    layout.write_index(out / layout.JSON_DIRNAME, layout.VAL_SPLIT, entries[n_train:])
    meta["complete"] = True
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return {"n_train": n_train, "n_val": n_val, "n_frames": spec.n_frames, "size": spec.size,
            "out": str(out)}
