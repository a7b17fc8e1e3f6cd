"""The frozen-feature cache: key, build, read, corruption, concurrency, and training on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from core.cli import train_main
from core.config import load_config
from core.data.config import FeatureCacheConfig
from core.data.feature_cache.build import ensure_cache
from core.data.feature_cache.key import MANIFEST, CacheError, folder_name, key_inputs
from core.data.feature_cache.reader import open_cache
from core.errors import ConfigError
from core.models.build import build_encoder
from core.names import FEATURES_KEY, VIDEO_KEY
from core.tools import cache_features
from core.train import make_datamodule, train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny(tmp_path: Path, *overrides: str):
    return load_config("tiny", [f"feature_cache.dir={tmp_path / 'features'}", *overrides])


def _setup(cfg):
    cfg, dm = make_datamodule(cfg, None)
    encoder = build_encoder(cfg)
    splits = {"train": dm.train_set.records, "val": dm.val_set.records}
    return cfg, dm, encoder, splits


def _ensure(cfg, dm, encoder, splits, build=True, logs=None, **kw):
    fc = replace(cfg.feature_cache, **kw)
    return ensure_cache(encoder, cfg.dataset, splits, fc, cfg.model.encoder.backbone.model,
                        build=build, normalization=(dm.mean, dm.std),
                        log=(logs.append if logs is not None else lambda m: None))


def test_the_key_changes_with_everything_that_determines_the_features(tmp_path):
    cfg, dm, encoder, splits = _setup(tiny(tmp_path))
    norm = (dm.mean, dm.std)
    base = key_inputs(encoder, cfg.dataset, splits, "bf16", "vit", norm)
    assert folder_name(base) == folder_name(key_inputs(build_encoder(cfg), cfg.dataset, splits,
                                                       "bf16", "vit", norm))
    names = {folder_name(base)}
    other_seed = build_encoder(load_config("tiny", ["model.encoder.backbone.seed=1"]))
    layer0 = build_encoder(load_config("tiny", ["model.encoder.backbone.layer=0"]))
    variants = [
        key_inputs(other_seed, cfg.dataset, splits, "bf16", "vit", norm),
        key_inputs(layer0, cfg.dataset, splits, "bf16", "vit", norm),
        key_inputs(encoder, replace(cfg.dataset, img_size=28), splits, "bf16", "vit", norm),
        key_inputs(encoder, replace(cfg.dataset, resize="stretch"), splits, "bf16", "vit", norm),
        key_inputs(encoder, cfg.dataset, splits, "fp16", "vit", norm),
        key_inputs(encoder, cfg.dataset, splits, "bf16", "vit", ((0.5,) * 3, (0.5,) * 3)),
        key_inputs(encoder, cfg.dataset, {"train": splits["train"][:-1], "val": splits["val"]},
                   "bf16", "vit", norm),
    ]
    for inputs in variants:
        names.add(folder_name(inputs))
    assert len(names) == 1 + len(variants)


def test_cached_features_are_the_backbone_output_in_bf16_across_shards(tmp_path):
    cfg, dm, encoder, splits = _setup(tiny(tmp_path))
    cache = _ensure(cfg, dm, encoder, splits, shard_mb=5 / 1024)  # 5 frames of 1 KiB per shard
    train_split = cache.splits["train"]
    assert len(train_split.shards) == 5 and train_split.frames == 24
    assert cache.manifest["splits"]["val"]["videos"] == [len(r) for r in splits["val"]]
    # a clip crossing a shard boundary (rows 4, 5: videos of 4 frames, clips of 2) equals the
    # backbone on those frames
    assert [len(r) for r in splits["train"]] == [4] * 6
    video, _ = dm.train_set.load_video(1, 0)
    with torch.no_grad():
        expected = encoder(video).to(torch.bfloat16)
    rows = train_split.clip_rows(1, 0, 2)
    assert rows.tolist() == [4, 5]
    got = train_split.gather(rows.unsqueeze(0))[0]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)
    # the loader's batches carry features, not frames (validation keeps its frames for pictures)
    dm.use_features(cache)
    batch = next(iter(dm.train_dataloader()))
    assert FEATURES_KEY in batch and VIDEO_KEY not in batch
    assert batch[FEATURES_KEY].shape == (4, 2, 16, 32)
    val = next(iter(dm.val_dataloader()))
    assert {FEATURES_KEY, VIDEO_KEY, "masks"} <= set(val)


def test_fp16_storage_and_an_existing_cache_is_found_not_rebuilt(tmp_path):
    cfg, dm, encoder, splits = _setup(tiny(tmp_path))
    logs: list[str] = []
    first = _ensure(cfg, dm, encoder, splits, logs=logs, dtype="fp16")
    second = _ensure(cfg, dm, encoder, splits, logs=logs, dtype="fp16")
    assert first.root == second.root
    assert sum(m.startswith("building") for m in logs) == 1
    assert first.splits["val"].gather(torch.arange(2).unsqueeze(0)).dtype == torch.float16
    # mode auto without a cache for this key: nothing is built
    assert _ensure(cfg, dm, encoder, splits, build=False, dtype="bf16") is None


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "bad_json",
                                    "missing_shard"])
def test_a_damaged_cache_is_detected_and_rebuilt_never_read(tmp_path, damage):
    cfg, dm, encoder, splits = _setup(tiny(tmp_path))
    cache = _ensure(cfg, dm, encoder, splits)
    good = cache.splits["train"].gather(torch.arange(3).unsqueeze(0)).clone()
    shard = cache.root / cache.manifest["splits"]["train"]["shards"][0]["file"]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "flip_byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the digest can tell
        shard.write_bytes(bytes(data))
        os.utime(shard, ns=(1, 1))
    elif damage == "no_manifest":
        (cache.root / MANIFEST).unlink()
    elif damage == "bad_json":
        (cache.root / MANIFEST).write_text("{not json")
    else:
        shard.unlink()
    with pytest.raises(CacheError):
        open_cache(cache.root, cache.manifest["key_inputs"])
    logs: list[str] = []
    again = _ensure(cfg, dm, encoder, splits, build=False, logs=logs)  # even in mode auto
    assert any("unusable" in m for m in logs) and any(m.startswith("building") for m in logs)
    assert torch.equal(again.splits["train"].gather(torch.arange(3).unsqueeze(0)), good)


def test_a_build_killed_part_way_leaves_nothing_that_is_read(tmp_path):
    cfg, dm, encoder, splits = _setup(tiny(tmp_path))
    root = tmp_path / "features"
    inputs = key_inputs(encoder, cfg.dataset, splits, "bf16", "vit", (dm.mean, dm.std))
    stale = root / f".{folder_name(inputs)}-killed"
    stale.mkdir(parents=True)
    (stale / "train-00000.arrow").write_bytes(b"half")
    assert _ensure(cfg, dm, encoder, splits, build=False) is None  # not mistaken for a cache
    assert not stale.exists()  # and cleaned up
    assert _ensure(cfg, dm, encoder, splits) is not None


def test_concurrent_builders_build_once(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from dataclasses import replace
        from core.config import load_config
        from core.tools import cache_features
        cfg = load_config("tiny", ["feature_cache.dir={tmp_path / 'features'}"])
        logs = []
        cache = cache_features(cfg, log=logs.append)
        print(sum(m.startswith("building") for m in logs), cache.root)
    """)
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    built = [int(o[0].split()[0]) for o in outs]
    roots = {o[0].split()[1] for o in outs}
    assert sorted(built) == [0, 0, 1] and len(roots) == 1


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def test_training_on_the_cache_matches_the_backbone_in_the_loop(tmp_path, capsys):
    over = ["trainer.max_steps=4", "trainer.val_check_interval=4", "dataset.num_workers=2"]
    cache = cache_features(tiny(tmp_path, *over))
    loop, cached = Losses(), Losses()
    plain = train(tiny(tmp_path, *over, "feature_cache.mode=off"), [loop],
                  log_dir=tmp_path / "a", progress_bar=False)
    assert "the backbone runs" not in capsys.readouterr().out  # mode off: says nothing
    fast = train(tiny(tmp_path, *over), [cached], log_dir=tmp_path / "b", progress_bar=False)
    out = capsys.readouterr().out
    assert f"feature cache: using {cache.root}" in out
    assert plain["feature_cache"] is None and fast["feature_cache"] == str(cache.root)
    np.testing.assert_allclose(cached.values, loop.values, rtol=2e-2)
    for key in ("val/loss", "val/mbo"):
        assert fast["metrics"][key] == pytest.approx(plain["metrics"][key], rel=2e-2, abs=1e-3)
    assert (Path(fast["run_dir"]) / "visualizations" / "step=4.png").is_file()


def test_refusals_say_why(tmp_path, capsys):
    cfg = tiny(tmp_path, "dataset.hflip=0.5", "trainer.max_steps=1")
    with pytest.raises(ConfigError, match=r"hflip=0\.5 flips training clips"):
        cache_features(cfg)
    result = train(cfg, log_dir=tmp_path, progress_bar=False)
    assert result["feature_cache"] is None
    assert "feature cache: not used: dataset.hflip=0.5" in capsys.readouterr().out
    tuned = tiny(tmp_path, "model.encoder.backbone.frozen=false")
    with pytest.raises(ConfigError, match="the backbone trains"):
        cache_features(tuned)


def test_config_values_and_yaml_booleans():
    cfg = load_config("tiny", ["feature_cache.mode=off", "feature_cache.gpu=on"])
    assert (cfg.feature_cache.mode, cfg.feature_cache.gpu) == ("off", "on")
    for bad, match in (("feature_cache.mode=sometimes", "feature_cache.mode"),
                       ("feature_cache.dtype=fp8", "feature_cache.dtype"),
                       ("dataset.hflip=2", "dataset.hflip")):
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", [bad])
    assert FeatureCacheConfig().mode == "auto"


def test_gpu_on_without_a_gpu_is_one_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = tiny(tmp_path, "feature_cache.mode=build", "feature_cache.gpu=on")
    assert train_main(["tiny", f"feature_cache.dir={tmp_path / 'features'}",
                       "feature_cache.mode=build", "feature_cache.gpu=on",
                       "--log-dir", str(tmp_path)]) == 2
    assert cfg.feature_cache.gpu == "on"


def test_cli_builds_verifies_and_reports_errors_in_one_line(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=180)

    where = f"feature_cache.dir={tmp_path / 'features'}"
    built = run("cache-features", "tiny", where)
    assert built.returncode == 0, built.stderr
    assert "feature cache: " in built.stdout and "frames {'train': 24, 'val': 8}" in built.stdout
    assert "building feature cache" in built.stderr
    verified = run("cache-features", "tiny", where, "--verify")
    assert verified.returncode == 0 and "verified: OK, all " in verified.stdout
    assert "each matches its blake2b digest" in verified.stdout
    assert "building" not in verified.stderr
    manifest = json.loads(next((tmp_path / "features").glob("*/manifest.json")).read_text())
    root = next((tmp_path / "features").glob("*/manifest.json")).parent
    shard = root / next(iter(manifest["splits"].values()))["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the digest can tell
    shard.write_bytes(bytes(data))
    repaired = run("cache-features", "tiny", where, "--verify")
    assert repaired.returncode == 0, repaired.stderr
    assert "does not match its digest" in repaired.stderr and "rebuilding" in repaired.stderr
    assert "verified: OK" in repaired.stdout  # of the rebuilt cache
    assert manifest["complete"] and manifest["key_inputs"]["backbone"] == "vit"
    for args, needle in (
        (("cache-features", "tiny", "feature_cache.nope=1"), "feature_cache.nope"),
        (("cache-features", "tiny", "model.encoder.backbone.frozen=false"), "backbone trains"),
        (("cache-features", "tiny", "feature_cache.dir=/proc/nope"), "cannot be used"),
    ):
        bad = run(*args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and needle in lines[0], bad.stderr
        assert "Traceback" not in bad.stderr


def test_a_split_copied_to_a_device_gathers_the_same_rows(tmp_path):
    # the GPU path (one tensor on the device, batches gathered there), exercised on the CPU
    cfg, dm, encoder, splits = _setup(tiny(tmp_path))
    cache = _ensure(cfg, dm, encoder, splits, shard_mb=5 / 1024)
    split = cache.splits["train"]
    rows = torch.stack([split.clip_rows(v, 1, 2) for v in (0, 2, 5)])  # crosses shard 0 -> 1
    mapped = split.gather(rows)
    split.to_device(torch.device("cpu"))
    assert split.device_tensor is not None and split.device_tensor.shape == (24, 16, 32)
    assert torch.equal(split.gather(rows), mapped)


def test_names_from_content_are_stable():
    """The data folder, the cache folder and a sweep's id are the one digest helper's output, and
    it is the digest earlier releases wrote (caches and sweeps made before keep being found)."""
    import hashlib
    import json

    from core.hashing import json_digest

    obj = {"b": [1, 2.5, "x"], "a": None}
    expected = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    assert json_digest(obj, 16) == expected[:16] and json_digest(obj, 64) == expected
    assert json_digest(["shapes", "/runs"], 12) == hashlib.sha256(
        json.dumps(["shapes", "/runs"]).encode()).hexdigest()[:12]


def test_shard_digest_is_the_one_manifests_record(tmp_path):
    """Builders and readers share core.hashing.file_digest: the 128-bit blake2b of the file's
    bytes, the value written into manifests before (existing caches keep passing their check)."""
    import hashlib

    from core.hashing import file_digest

    path = tmp_path / "shard.arrow"
    for payload in (b"", b"slotsweep" * 1000):
        path.write_bytes(payload)
        assert file_digest(path) == hashlib.blake2b(payload, digest_size=16).hexdigest()
