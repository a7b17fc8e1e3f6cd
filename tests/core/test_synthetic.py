"""Tests for core.data.synthetic: the seeded moving-shapes video generator and dataset writer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.layout import FRAMES_DIRNAME, JSON_DIRNAME, MASKS_DIRNAME
from core.data.synthetic import (
    DIGIT_SHAPES,
    GENERATOR_NAME,
    PALETTE,
    PLAIN_BACKGROUND,
    SyntheticSpec,
    Video,
    generate_video,
    rasterize,
    render_frame,
    video_rng,
    write_synthetic_dataset,
)

SMALL = SyntheticSpec(n_frames=6, size=48)


def gen(seed: int, spec: SyntheticSpec = SMALL) -> Video:
    return generate_video(np.random.default_rng(seed), spec)


def fully_inside(shape: str, x: float, y: float, r: float, size: int) -> bool:
    """The shape's pixel count in the frame equals its count on a padded canvas."""
    pad = size
    inner = rasterize(shape, x, y, r, size).sum()
    outer = rasterize(shape, x + pad, y + pad, r, size + 2 * pad).sum()
    return bool(inner == outer and inner > 0)


def load_index(root: Path, split: str) -> list[dict]:
    return json.loads((root / JSON_DIRNAME / f"{split}.json").read_text())["videos"]


# --- determinism -------------------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs() -> None:
    a, b, c = gen(7), gen(7), gen(8)
    assert a.frames.tobytes() == b.frames.tobytes()
    assert a.masks.tobytes() == b.masks.tobytes()
    assert a.objects == b.objects
    assert a.frames.tobytes() != c.frames.tobytes()


def test_video_depends_only_on_seed_and_index(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_frames=3, size=32)
    write_synthetic_dataset(tmp_path / "a", 2, spec, seed=3, image_format="png")
    write_synthetic_dataset(tmp_path / "b", 5, spec, seed=3, image_format="png")
    for vid in ("video_00000", "video_00001"):
        for sub in (FRAMES_DIRNAME, MASKS_DIRNAME):
            files = sorted((tmp_path / "a" / sub / vid).iterdir())
            assert len(files) == 3
            for f in files:
                assert f.read_bytes() == (tmp_path / "b" / sub / vid / f.name).read_bytes()
    v1 = generate_video(video_rng(3, 1), spec)
    mask = np.array(Image.open(tmp_path / "b" / MASKS_DIRNAME / "video_00001" / "000002.png"))
    np.testing.assert_array_equal(mask, v1.masks[2])


# --- objects, ids, colours ---------------------------------------------------------------------


@pytest.mark.parametrize("lo,hi", [(1, 1), (2, 6), (5, 12)])
def test_object_counts_ids_and_attributes(lo: int, hi: int) -> None:
    spec = SyntheticSpec(n_frames=4, size=48, min_objects=lo, max_objects=hi)
    seen = set()
    for seed in range(25):
        v = gen(seed, spec)
        n = len(v.objects)
        seen.add(n)
        assert lo <= n <= hi
        assert v.frames.shape == (4, 48, 48, 3) and v.frames.dtype == np.uint8
        assert v.masks.shape == (4, 48, 48) and v.masks.dtype == np.uint8
        assert v.positions.shape == v.velocities.shape == (4, n, 2)
        assert [o["id"] for o in v.objects] == list(range(1, n + 1))
        assert sorted(o["depth"] for o in v.objects) == list(range(n))
        assert set(np.unique(v.masks)) - {0} <= set(range(1, n + 1))
        assert len({tuple(o["color"]) for o in v.objects}) == n
        assert len({o["size"] for o in v.objects}) == n
        for o in v.objects:
            assert set(o) >= {"id", "shape", "color", "size", "depth", "position", "velocity"}
            assert spec.min_size * 48 <= o["size"] <= spec.max_size * 48
            assert o["position"] == pytest.approx(list(v.positions[0, o["id"] - 1]))
        json.dumps(v.objects)  # JSON-serialisable
    if hi > lo:
        assert len(seen) > 1


def test_ids_persistent_and_frames_agree_with_masks() -> None:
    for seed in range(15):
        v = gen(seed)
        colours = {tuple(o["color"]) for o in v.objects}
        for t in range(v.frames.shape[0]):
            # Re-rendering from the recorded positions gives the same mask: ids follow objects.
            f, m = render_frame(v.objects, v.positions[t], SMALL)
            np.testing.assert_array_equal(m, v.masks[t])
            np.testing.assert_array_equal(f, v.frames[t])
            for o in v.objects:
                px = v.frames[t][v.masks[t] == o["id"]]
                assert (px == o["color"]).all()
            bg = v.frames[t][v.masks[t] == 0]
            assert (bg == PLAIN_BACKGROUND).all()
            assert not any((bg == c).all(axis=-1).any() for c in colours)
        # Over the video, nearly every object is seen (full occlusion throughout is rare).
        visible = set(np.unique(v.masks)) - {0}
        assert len(visible) >= len(v.objects) - 1


# --- motion and bounces ------------------------------------------------------------------------


def test_objects_move_and_stay_inside() -> None:
    spec = SyntheticSpec(n_frames=6, size=48, min_objects=1, max_objects=1)
    for seed in range(20):
        v = gen(seed, spec)
        o = v.objects[0]
        assert np.hypot(*o["velocity"]) > 0
        cents = [np.argwhere(m == 1).mean(axis=0) for m in v.masks]
        for a, b in itertools.pairwise(cents):
            assert np.abs(a - b).max() > 0.2
        for x, y in v.positions[:, 0]:
            assert fully_inside(o["shape"], x, y, o["size"], 48)


def test_bounce_reflects_velocity_and_keeps_shape_inside() -> None:
    spec = SyntheticSpec(n_frames=60, size=32, min_objects=3, max_objects=3, max_speed=4.0)
    for seed in range(5):
        v = gen(seed, spec)
        for i, o in enumerate(v.objects):
            r = o["size"]
            pos, vel = v.positions[:, i], v.velocities[:, i]
            assert (pos >= r - 1e-9).all() and (pos <= 31 - r + 1e-9).all()
            for x, y in pos:
                assert fully_inside(o["shape"], x, y, r, 32)
            flips = (np.sign(vel[1:]) != np.sign(vel[:-1])).sum()
            assert flips >= 1
            # speed is kept per axis
            np.testing.assert_allclose(np.abs(vel), np.abs(vel[:1]).repeat(len(vel), 0))


# --- occlusion ---------------------------------------------------------------------------------


def test_render_frame_depth_order() -> None:
    spec = SyntheticSpec(size=32)
    big = {"id": 1, "shape": "disk", "color": [255, 0, 0], "size": 8.0, "depth": 0}
    small = {"id": 2, "shape": "square", "color": [0, 0, 255], "size": 3.0, "depth": 1}
    pos = np.array([[16.0, 16.0], [16.0, 16.0]])
    sq = rasterize("square", 16, 16, 3.0, 32)
    disk = rasterize("disk", 16, 16, 8.0, 32)
    frame, mask = render_frame([big, small], pos, spec)
    assert (mask[sq] == 2).all() and (mask[disk & ~sq] == 1).all() and (mask[~disk] == 0).all()
    assert (frame[sq] == [0, 0, 255]).all()
    frame, mask = render_frame([{**big, "depth": 1}, {**small, "depth": 0}], pos, spec)
    assert (mask[disk] == 1).all() and (frame[disk] == [255, 0, 0]).all()


def test_occlusion_matches_depth_order_in_generated_videos() -> None:
    spec = SyntheticSpec(n_frames=3, size=40, min_objects=4, max_objects=8)
    overlaps = 0
    for seed in range(10):
        v = gen(seed, spec)
        for t in range(3):
            cover = np.stack([
                rasterize(o["shape"], *v.positions[t, i], o["size"], 40)
                for i, o in enumerate(v.objects)
            ])
            depth = np.array([o["depth"] for o in v.objects])
            overlaps += int((cover.sum(0) >= 2).sum())
            keyed = np.where(cover, depth[:, None, None], -1)
            expected = np.where(cover.any(0), keyed.argmax(0) + 1, 0)
            np.testing.assert_array_equal(v.masks[t], expected)
    assert overlaps > 0


# --- options -----------------------------------------------------------------------------------


def test_digits_option() -> None:
    spec = SyntheticSpec(n_frames=2, size=48, shapes=("disk",), digits=True, max_objects=8)
    shapes = {o["shape"] for s in range(10) for o in gen(s, spec).objects}
    assert shapes & set(DIGIT_SHAPES) and "disk" in shapes
    assert shapes <= {"disk", *DIGIT_SHAPES}
    glyphs = [rasterize(d, 24, 24, 10.0, 48) for d in DIGIT_SHAPES]
    assert all(g.any() for g in glyphs)
    assert len({g.tobytes() for g in glyphs}) == 10
    only = SyntheticSpec(n_frames=2, size=32, shapes=("digit3",))
    assert all(o["shape"] == "digit3" for o in gen(0, only).objects)


def test_textured_background_option() -> None:
    spec = SyntheticSpec(n_frames=3, size=48, textured_background=True)
    varied = 0
    for seed in range(8):
        v = gen(seed, spec)
        assert v.frames.tobytes() == gen(seed, spec).frames.tobytes()
        for o in v.objects:
            assert (v.frames[v.masks == o["id"]] == o["color"]).all()
        bg = v.frames[0][v.masks[0] == 0]
        varied += len(np.unique(bg, axis=0)) > 1
    assert varied >= 6
    plain = SyntheticSpec(n_frames=3, size=48)
    assert gen(0, spec).frames.tobytes() != gen(0, plain).frames.tobytes()


def test_shared_colours_option() -> None:
    """colors=n: objects draw from n palette colours with replacement, so they share them; the
    default keeps one colour per object and the same draws as before the option existed."""
    spec = SyntheticSpec(n_frames=2, size=48, min_objects=5, max_objects=6, colors=2)
    shared = 0
    for seed in range(6):
        v = gen(seed, spec)
        colours = [tuple(o["color"]) for o in v.objects]
        assert set(colours) <= {tuple(c) for c in PALETTE[:2]}
        shared += len(set(colours)) < len(colours)
        for o in v.objects:  # masks still tell same-coloured objects apart
            assert (v.frames[v.masks == o["id"]] == o["color"]).all()
    assert shared == 6
    plain = SyntheticSpec(n_frames=2, size=48, min_objects=5, max_objects=6)
    for seed in range(6):
        colours = [tuple(o["color"]) for o in gen(seed, plain).objects]
        assert len(set(colours)) == len(colours)


# --- dataset writer ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_write_dataset_layout_and_content(tmp_path: Path, fmt: str) -> None:
    spec = SyntheticSpec(n_frames=4, size=32)
    calls: list[tuple[int, int]] = []
    summary = write_synthetic_dataset(
        tmp_path, 5, spec, seed=11, image_format=fmt, progress=lambda i, n: calls.append((i, n))
    )
    assert summary == {"n_train": 4, "n_val": 1, "n_frames": 4, "size": 32, "out": str(tmp_path)}
    assert calls == [(i, 5) for i in range(1, 6)]
    train, val = load_index(tmp_path, "train"), load_index(tmp_path, "val")
    assert [e["id"] for e in train + val] == [f"video_{i:05d}" for i in range(5)]
    for i, e in enumerate(train + val):
        v = generate_video(video_rng(11, i), spec)
        assert e["height"] == e["width"] == 32 and e["objects"] == v.objects
        assert len(e["frames"]) == len(e["masks"]) == 4
        for t, (fp, mp) in enumerate(zip(e["frames"], e["masks"], strict=True)):
            assert fp.endswith("." + fmt) and mp.endswith(".png")
            mask_img = Image.open(tmp_path / MASKS_DIRNAME / mp)
            assert mask_img.mode == "L"
            np.testing.assert_array_equal(np.array(mask_img), v.masks[t])
            frame = np.array(Image.open(tmp_path / FRAMES_DIRNAME / fp).convert("RGB"))
            if fmt == "png":
                np.testing.assert_array_equal(frame, v.frames[t])
            else:
                assert np.abs(frame.astype(int) - v.frames[t]).mean() < 3.0
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["generator"] == GENERATOR_NAME and meta["seed"] == 11 and meta["complete"]
    assert meta["n_train"] == 4 and meta["n_val"] == 1 and meta["spec"]["size"] == 32


@pytest.mark.parametrize(
    "n,frac,expected",
    [(1, 0.25, (1, 0)), (2, 0.25, (1, 1)), (4, 0.0, (4, 0)), (8, 0.25, (6, 2)), (3, 0.9, (1, 2))],
)
def test_split_counts(tmp_path: Path, n: int, frac: float, expected: tuple[int, int]) -> None:
    spec = SyntheticSpec(n_frames=1, size=16, max_objects=2)
    s = write_synthetic_dataset(tmp_path, n, spec, seed=0, val_fraction=frac, image_format="png")
    assert (s["n_train"], s["n_val"]) == expected
    assert len(load_index(tmp_path, "train")) == expected[0]
    assert len(load_index(tmp_path, "val")) == expected[1]


def test_refuses_foreign_directory_and_overwrites_own(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_frames=2, size=16)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="empty directory"):
        write_synthetic_dataset(foreign, 2, spec, seed=0)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError):
        write_synthetic_dataset(tmp_path / "afile", 2, spec, seed=0)

    own = tmp_path / "own"
    write_synthetic_dataset(own, 4, spec, seed=0)
    (own / FRAMES_DIRNAME / "stale.txt").write_text("old")
    s = write_synthetic_dataset(own, 2, spec, seed=1, image_format="png")
    assert (s["n_train"], s["n_val"]) == (1, 1)
    names = sorted(p.name for p in (own / FRAMES_DIRNAME).iterdir())
    assert names == ["video_00000", "video_00001"]
    assert all(p.suffix == ".png" for p in (own / FRAMES_DIRNAME).rglob("*.*"))
    assert json.loads((own / "dataset.json").read_text())["seed"] == 1


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_frames": 0}, "n_frames"),
        ({"size": 8}, "size"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": 4, "max_objects": 3}, "min_objects"),
        ({"max_objects": 13}, "max_objects"),
        ({"shapes": ()}, "shapes"),
        ({"shapes": ("disk", "hexagon")}, "hexagon"),
        ({"shapes": "disk"}, "shapes"),
        ({"min_size": 0.3, "max_size": 0.2}, "min_size"),
        ({"max_size": 0.6}, "max_size"),
        ({"max_speed": -1.0}, "max_speed"),
        ({"colors": 0}, "colors"),
        ({"colors": 13}, "colors"),
    ],
)
def test_spec_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SyntheticSpec(**kwargs)


def test_writer_validation(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_frames=1, size=16)
    with pytest.raises(ValueError, match="n_videos"):
        write_synthetic_dataset(tmp_path / "a", 0, spec, seed=0)
    with pytest.raises(ValueError, match="image_format"):
        write_synthetic_dataset(tmp_path / "b", 1, spec, seed=0, image_format="gif")
    with pytest.raises(ValueError, match="val_fraction"):
        write_synthetic_dataset(tmp_path / "c", 2, spec, seed=0, val_fraction=1.0)
    assert not any(tmp_path.iterdir())


def test_spec_from_cli_flags_and_from_config_block_agree() -> None:
    """`make-data synthetic` and a config's `dataset.synthetic` block build the same spec through
    one constructor, and their defaults are the generator's own."""
    import argparse

    from core.cli import add_make_data
    from core.data.config import SyntheticDataConfig

    parser = argparse.ArgumentParser()
    add_make_data(parser.add_subparsers())
    args = parser.parse_args(["make-data", "synthetic", "--out", "x"])
    from_cli = SyntheticSpec.from_options(args)
    from_cfg = SyntheticSpec.from_options(SyntheticDataConfig())
    assert from_cli == from_cfg == SyntheticSpec()
    custom = SyntheticDataConfig(frames=3, colors=2, digits=True, max_speed=1.5)
    spec = SyntheticSpec.from_options(custom)
    assert (spec.n_frames, spec.colors, spec.digits, spec.max_speed) == (3, 2, True, 1.5)
