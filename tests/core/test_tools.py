"""After-training tools: extract-features and visualize on a trained checkpoint."""

from __future__ import annotations

import torch
from PIL import Image

from core.config import load_config
from core.train import train
from orchestrator.cli import main


def test_extract_features_and_visualize(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path / "cache"))
    result = train(load_config("tiny"), run_dir=tmp_path / "run", progress_bar=False)
    ckpt = result["checkpoints"][-1]
    assert main(["extract-features", "--checkpoint", ckpt, "--output-dir",
                 str(tmp_path / "features")]) == 0
    data = torch.load(tmp_path / "features" / "val.pt", weights_only=True)
    n = len(data["video_ids"])
    assert n == 2 * 2  # 2 val videos x 2 non-overlapping 2-frame clips of 4 frames
    assert data["slots"].shape == (n, 2, 3, 16)
    assert data["objects"][0] and "shape" in data["objects"][0][0]
    assert main(["visualize", "--checkpoint", ckpt, "--clips", "2"]) == 0
    pngs = sorted((tmp_path / "run" / "visualizations" / "step=2").glob("*.png"))
    assert [p.name for p in pngs] == ["clip00.png", "clip01.png"]
    assert Image.open(pngs[0]).size[0] == 2 * 58 + 2
    assert "wrote 2 images" in capsys.readouterr().out


def test_tools_bad_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"nope")
    assert main(["visualize", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is corrupt" in err and "\n" not in err
