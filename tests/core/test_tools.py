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
    assert data["object_rows"] and "shape" in data["object_rows"][0]
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


def test_long_work_shows_counts_rate_and_eta_off_a_terminal_and_nothing_when_short():
    import io
    import re

    from core.text import Progress

    out = io.StringIO()
    with Progress("building feature cache", 1000, "frames", stream=out, every_s=10.0,
                  after_s=3.0, tty=False) as bar:
        bar.update(100)  # within the first 3 s: silent
        assert out.getvalue() == ""
        bar.start -= 20.0  # 20 s in, 320 frames done
        bar.update(220)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("building feature cache: 320/1000 frames (32%) · 16 frames/s")
    assert re.search(r"ETA 4[23]s$", lines[0]), lines[0]  # 680 frames more at 16/s
    assert len(lines) == 1  # the end showed nothing new: not said twice
    out = io.StringIO()
    with Progress("extracting", 100, "clips", stream=out, tty=False) as bar:
        bar.start -= 20.0
        bar.update(40)
        bar.update(60)  # within 10 s of the last line: said at the end
    assert [line.split(" · ")[0] for line in out.getvalue().splitlines()] == [
        "extracting: 40/100 clips (40%)", "extracting: 100/100 clips (100%)"]
    quick = io.StringIO()
    with Progress("x", 10, "videos", stream=quick, tty=False) as bar:
        bar.update(10)
    assert quick.getvalue() == ""  # short work prints nothing


def test_long_work_on_a_terminal_is_tqdms_live_bar():
    import io

    from core.text import Progress

    out = io.StringIO()
    with Progress("generating videos", 8, "videos", stream=out, after_s=0.0, tty=True) as bar:
        bar.update(4)
        assert bar._bar is not None  # redrawn in place (\r), at most every 0.1 s
        assert out.getvalue().startswith("\rgenerating videos:") and "/8 [" in out.getvalue()
