"""Real-data loaders: index files, frame folders, clips, the DataModule, bad-input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import error_line
from core.data import layout
from core.data.clips import IMAGENET_MEAN, IMAGENET_STD, ClipDataset
from core.data.config import DatasetConfig, resolve_paths
from core.data.datamodule import VideoDataModule, load_records
from core.data.records import read_index, scan_folders
from core.data.synthetic import SyntheticSpec, write_synthetic_dataset
from core.errors import ConfigError, DataError
from core.models.encoder import backbone_normalization
from core.names import MASKS_KEY, VIDEO_KEY
from orchestrator.cli import main

SIZE = 32
FRAMES = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synthetic"
    spec = SyntheticSpec(n_frames=FRAMES, size=SIZE)
    write_synthetic_dataset(root, 8, spec, seed=3, val_fraction=0.25, image_format="png")
    return root


@pytest.fixture()
def copy(dataset, tmp_path) -> Path:
    """A private copy of the dataset that a test may break."""
    target = tmp_path / "copy"
    shutil.copytree(dataset, target)
    return target


def _cfg(root: Path, **kw) -> DatasetConfig:
    base = dict(img_size=SIZE, ep_length=4, batch_size=2, num_workers=0)
    base.update(kw)
    return resolve_paths(DatasetConfig(**base), root)


def _denormalise(video: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((video * std + mean) * 255).permute(0, 2, 3, 1).numpy()


def test_resolve_paths_defaults_to_the_layout(dataset):
    cfg = resolve_paths(DatasetConfig(), dataset)
    assert cfg.json_dir == str(dataset / "json")
    assert cfg.img_dir == str(dataset / "frames")
    assert cfg.mask_dir == str(dataset / "masks")
    relative = resolve_paths(DatasetConfig(json_dir="json", img_dir="frames"), dataset)
    assert relative.img_dir == str(dataset / "frames")


def test_index_round_trip_frames_and_masks_match_the_files(dataset):
    cfg = _cfg(dataset)
    records = load_records(cfg, "val")
    assert len(records) == 2 and all(len(r) == FRAMES for r in records)
    ds = ClipDataset(records, 4, SIZE, train=False)
    sample = ds[0]
    assert sample[VIDEO_KEY].shape == (4, 3, SIZE, SIZE)
    assert sample[MASKS_KEY].shape == (4, SIZE, SIZE) and sample[MASKS_KEY].dtype == torch.int64
    first = records[0]
    for t in range(4):
        mask = np.asarray(Image.open(first.masks[t]))
        frame = np.asarray(Image.open(first.frames[t]).convert("RGB")).astype(np.float32)
        assert np.array_equal(sample[MASKS_KEY][t].numpy(), mask)
        assert np.abs(_denormalise(sample[VIDEO_KEY])[t] - frame).max() < 1e-3
    assert records[0].objects and {"id", "shape", "color", "size"} <= set(records[0].objects[0])


def test_validation_clips_are_fixed_and_cover_the_video(dataset):
    records = load_records(_cfg(dataset), "val")
    every = ClipDataset(records, 3, SIZE, train=False, val_clips="all")
    assert [c for c in every.clips] == [(0, 0), (0, 3), (1, 0), (1, 3)]
    first = ClipDataset(records, 3, SIZE, train=False, val_clips="first")
    assert first.clips == [(0, 0), (1, 0)]
    assert torch.equal(every[1][VIDEO_KEY], every[1][VIDEO_KEY])


def test_training_clips_are_random_within_bounds_and_have_no_masks(dataset):
    records = load_records(_cfg(dataset), "train")
    ds = ClipDataset(records, 4, SIZE, train=True)
    torch.manual_seed(0)
    starts = {ds[0]["start"] for _ in range(30)}
    assert starts <= {0, 1, 2} and len(starts) > 1
    assert MASKS_KEY not in ds[0]


def _batches(dm: VideoDataModule, n: int = 3) -> list[torch.Tensor]:
    out = []
    for _epoch in range(2):
        for i, batch in enumerate(dm.train_dataloader()):
            out.append(torch.cat([batch[VIDEO_KEY].flatten(), batch["start"].float()]))
            if i + 1 >= n:
                break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_datamodule_is_deterministic_given_the_seed(dataset, workers):
    cfg = _cfg(dataset, num_workers=workers)
    a = _batches(VideoDataModule(cfg, seed=7))
    b = _batches(VideoDataModule(cfg, seed=7))
    c = _batches(VideoDataModule(cfg, seed=8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_datamodule_batches(dataset):
    dm = VideoDataModule(_cfg(dataset, num_workers=0), seed=0)
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train[VIDEO_KEY].shape == (2, 4, 3, SIZE, SIZE)
    val = next(iter(dm.val_dataloader()))
    assert val[MASKS_KEY].shape == (2, 4, SIZE, SIZE)
    assert len(dm.train_dataloader()) == 3  # 6 train videos / batch 2, drop_last


def test_non_square_frames_are_centre_cropped(tmp_path):
    frames, masks = tmp_path / "frames" / "v", tmp_path / "masks" / "v"
    frames.mkdir(parents=True)
    masks.mkdir(parents=True)
    ids = np.zeros((20, 40), np.uint8)
    ids[:, 10:30] = 1  # the centre square is all object 1 ...
    ids[:, :10] = 2  # ... the sides are cropped away
    for t in range(2):
        Image.fromarray(np.full((20, 40, 3), 90, np.uint8)).save(frames / f"{t}.png")
        Image.fromarray(ids).save(masks / f"{t}.png")
    layout.write_index(tmp_path / "json", "val", [
        {"id": "v", "frames": ["v/0.png", "v/1.png"], "masks": ["v/0.png", "v/1.png"]}
    ])
    cfg = _cfg(tmp_path, ep_length=2, img_size=10)
    sample = ClipDataset(load_records(cfg, "val"), 2, 10, train=False)[0]
    assert sample[VIDEO_KEY].shape == (2, 3, 10, 10)
    assert torch.all(sample[MASKS_KEY] == 1)


def test_frame_folders_with_masks_and_hash_split(dataset):
    train = scan_folders(dataset / "frames", "train", dataset / "masks", val_fraction=0.3)
    val = scan_folders(dataset / "frames", "val", dataset / "masks", val_fraction=0.3)
    assert len(train) + len(val) == 8 and len(val) >= 1
    assert {r.id for r in train}.isdisjoint({r.id for r in val})
    assert all(r.masks is not None and len(r.masks) == FRAMES for r in train + val)
    again = scan_folders(dataset / "frames", "val", dataset / "masks", val_fraction=0.3)
    assert [r.id for r in again] == [r.id for r in val]
    no_masks = scan_folders(dataset / "frames", "train", None, val_fraction=0.3)
    assert all(r.masks is None for r in no_masks)


def test_frame_folders_with_split_subfolders_and_natural_order(tmp_path):
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        for name in names:
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for t in (1, 2, 10):
                Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"f{t}.jpg")
    cfg = resolve_paths(DatasetConfig(format="folders", ep_length=3, img_size=8), tmp_path)
    train = load_records(cfg, "train")
    assert [r.id for r in train] == ["train/a", "train/b"]
    assert [p.name for p in train[0].frames] == ["f1.jpg", "f2.jpg", "f10.jpg"]
    assert [r.id for r in load_records(cfg, "val")] == ["val/c"]


def test_backbone_normalization_comes_from_the_backbone():
    assert backbone_normalization("dino_say_vitb14") == (IMAGENET_MEAN, IMAGENET_STD)
    assert backbone_normalization("mugs_say_vitb16") == (IMAGENET_MEAN, IMAGENET_STD)
    assert backbone_normalization(None) == (IMAGENET_MEAN, IMAGENET_STD)
    mean, _ = backbone_normalization("vit_base_patch16_clip_224.openai")
    assert mean[0] == pytest.approx(0.48145466)
    with pytest.raises(ConfigError, match="unknown to timm"):
        backbone_normalization("no_such_backbone")
    cfg = DatasetConfig(mean=[0.5, 0.5, 0.5], std=[0.1, 0.1, 0.1])
    dm = VideoDataModule(cfg, normalization=(IMAGENET_MEAN, IMAGENET_STD))
    assert dm.mean == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- bad input: one line each


def _load(root: Path, split: str = "train", **kw):
    return load_records(_cfg(root, **kw), split)


def test_missing_directory(tmp_path):
    with pytest.raises(DataError, match=r"index directory .*nowhere/json does not exist"):
        _load(tmp_path / "nowhere")


def test_missing_split_file_lists_what_exists(copy):
    (copy / "json" / "val.json").unlink()
    with pytest.raises(DataError, match=r"val.json does not exist \(found: train.json\)"):
        _load(copy, "val")


def test_empty_dataset(copy):
    layout.write_index(copy / "json", "train", [])
    with pytest.raises(DataError, match="no videos in the train split"):
        _load(copy)


def test_video_shorter_than_ep_length(dataset):
    with pytest.raises(DataError, match=r"video video_00000 .* has 6 frames, fewer than .*=7"):
        _load(dataset, ep_length=7)


def test_json_entry_naming_a_missing_file(copy):
    index = json.loads((copy / "json" / "train.json").read_text())
    index["videos"][1]["frames"][2] = "video_00001/gone.png"
    (copy / "json" / "train.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"frame .*video_00001/gone.png does not exist"):
        _load(copy)


def test_invalid_json(copy):
    (copy / "json" / "train.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train.json is not valid JSON"):
        _load(copy)


def test_unreadable_image(copy):
    (copy / "frames" / "video_00002" / "000000.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"frame .*video_00002/000000.png cannot be read"):
        _load(copy)


def test_unreadable_image_past_the_first_frame_is_found_by_check_all(copy):
    (copy / "frames" / "video_00002" / "000003.png").write_bytes(b"garbage")
    _load(copy, check_images="first")  # only headers of first frames: passes
    with pytest.raises(DataError, match=r"video_00002/000003.png cannot be read"):
        _load(copy, check_images="all")


def test_mask_whose_size_differs_from_its_frame(copy):
    Image.fromarray(np.zeros((SIZE, SIZE + 4), np.uint8)).save(
        copy / "masks" / "video_00001" / "000000.png"
    )
    with pytest.raises(DataError, match=r"mask .*000000.png is 36x32 but its frame .* is 32x32"):
        _load(copy)


def test_masks_listed_without_mask_dir(dataset):
    cfg = resolve_paths(DatasetConfig(ep_length=4, img_size=SIZE), dataset)
    with pytest.raises(DataError, match=r"dataset.mask_dir is not set"):
        read_index(cfg.json_dir, "train", cfg.img_dir, None)


def test_error_inside_a_worker_reaches_the_user_as_one_line(copy):
    (copy / "frames" / "video_00003" / "000005.png").write_bytes(b"garbage")
    records = _load(copy, ep_length=FRAMES)
    loader = torch.utils.data.DataLoader(
        ClipDataset(records, FRAMES, SIZE, train=True), batch_size=8, num_workers=1
    )
    with pytest.raises(DataError) as info:
        next(iter(loader))
    line = error_line(info.value)
    assert line.startswith("frame ") and "000005.png cannot be read" in line and "\n" not in line


def test_config_validation_errors():
    with pytest.raises(ConfigError, match=r"dataset.format='mp4' is not one of saycam, folders"):
        DatasetConfig(format="mp4").validate()
    with pytest.raises(ConfigError, match=r"dataset.ep_length must be >= 1"):
        DatasetConfig(ep_length=0).validate()


# ---------------------------------------------------------------- the command line


def test_cli_make_data_then_check_data(tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["make-data", "synthetic", "--out", str(out), "--videos", "4", "--frames", "3",
            "--size", "32", "--seed", "1"]
    assert main(argv) == 0
    assert "wrote 3 train + 1 val videos" in capsys.readouterr().out
    assert main(["check-data", "--data-dir", str(out), "--ep-length", "3", "--img-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "train: 3 videos, 9 frames, with masks" in printed
    assert "val: 1 videos, 3 frames, with masks, 1 fixed clips" in printed
    assert main(argv) == 2  # a second time: refused, nothing replaced
    err = capsys.readouterr().err.strip()
    assert err == (f"slotsweep: error: {out} already holds a generated dataset: add --force to "
                   "replace it, or pick another --out")
    assert main([*argv, "--videos", "6", "--force"]) == 0
    captured = capsys.readouterr()
    assert f"replacing the generated dataset in {out}" in captured.err
    assert "wrote 4 train + 2 val videos" in captured.out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("keep me")
    argv = ["make-data", "synthetic", "--out", str(tmp_path / "foreign"), "--videos", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slotsweep: error: ") and "\n" not in err
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "keep me"
    assert main(["check-data", "--data-dir", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing/json does not exist" in err and "\n" not in err


def _objects(root) -> list[dict]:
    index = json.loads((root / "json" / "train.json").read_text())
    return [o for video in index["videos"] for o in video["objects"]]


def test_the_configs_object_options_reach_the_generator(tmp_path):
    """dataset.synthetic's colors, sizes and speed decide what is generated."""
    from core.config import load_config
    from core.data.prepare import ensure_synthetic

    cfg = load_config("tiny", ["dataset.synthetic.colors=1", "dataset.synthetic.max_speed=0.0",
                               "dataset.synthetic.min_size=0.2", "dataset.synthetic.max_size=0.25"])
    root = ensure_synthetic(cfg.dataset, tmp_path / "d")
    objects = _objects(root)
    assert objects and len({tuple(o["color"]) for o in objects}) == 1
    assert all(o["velocity"] == [0.0, 0.0] for o in objects)
    assert all(0.2 * 56 <= o["size"] <= 0.25 * 56 for o in objects)


def test_cli_make_data_object_options(tmp_path):
    out = tmp_path / "gen"
    argv = ["make-data", "synthetic", "--out", str(out), "--videos", "4", "--frames", "2",
            "--size", "32", "--colors", "1", "--max-speed", "0", "--min-size", "0.2",
            "--max-size", "0.25"]
    assert main(argv) == 0
    objects = _objects(out)
    assert len({tuple(o["color"]) for o in objects}) == 1
    assert all(o["velocity"] == [0.0, 0.0] for o in objects)
    assert all(0.2 * 32 <= o["size"] <= 0.25 * 32 for o in objects)


def test_loader_processes_are_capped_at_the_cpus_with_one_line(monkeypatch, capsys):
    import os

    from core.data.datamodule import usable_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert usable_workers(4, say=True) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dataset.num_workers=4: using 2 loader processes, as many as this machine "
                   "has CPUs"]
    assert usable_workers(1, say=True) == 1 and usable_workers(0) == 0
    assert capsys.readouterr().err == ""


def test_each_generated_video_is_labelled_by_its_largest_object(dataset, copy, tmp_path):
    from core.data.synthetic import COLOR_NAMES, PALETTE

    records = read_index(dataset / "json", "train", dataset / "frames", dataset / "masks")
    for record in records:
        largest = max(record.objects, key=lambda o: o["size"])
        colour = COLOR_NAMES[PALETTE.index(tuple(largest["color"]))]
        assert record.label == f"{colour} {largest['shape']}"
    index = copy / "json" / "train.json"
    payload = json.loads(index.read_text())
    payload["videos"][0]["label"] = {"not": "a name"}
    index.write_text(json.dumps(payload))
    with pytest.raises(DataError, match="a label is a category name"):
        read_index(copy / "json", "train", copy / "frames", copy / "masks")


def test_a_labelled_image_folder_is_single_frame_videos(tmp_path):
    from core.data.records import scan_labelled_images

    for category in ("ball", "car"):
        (tmp_path / "set" / category).mkdir(parents=True)
        for i in (2, 10):
            Image.new("RGB", (8, 8)).save(tmp_path / "set" / category / f"f{i}.jpg")
    records = scan_labelled_images(tmp_path / "set")
    assert [(r.id, r.label, len(r)) for r in records] == [
        ("ball/f2.jpg", "ball", 1), ("ball/f10.jpg", "ball", 1), ("car/f2.jpg", "car", 1),
        ("car/f10.jpg", "car", 1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"ROOT/<category>/<image>\.jpg"):
        scan_labelled_images(tmp_path / "empty")
