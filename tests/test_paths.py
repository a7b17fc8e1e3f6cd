"""Every folder a user can name, given as a file or as something unwritable: one line, exit 2,
nothing started and nothing written (issue: no traceback for a bad path)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.cli import main

# {file}: an existing file; {under}: a path below that file; {proc}: a folder that cannot be
# created (procfs refuses new entries, even to root).
CASES = [
    (["train", "tiny", "--log-dir", "{file}"], r"--log-dir \S+ is a file, not a folder"),
    (["train", "tiny", "--log-dir", "{under}"], r"--log-dir \S+ cannot be created: \S+ is a file"),
    (["train", "tiny", "--log-dir", "{proc}"], r"--log-dir \S+ cannot be used"),
    (["train", "tiny", "--data-dir", "{file}"], r"--data-dir \S+ is a file, not a folder"),
    (["make-data", "synthetic", "--out", "{proc}"], r"--out \S+ cannot be used"),
    (["make-data", "synthetic", "--out", "{file}"], r"--out \S+ is a file"),
    (["extract-features", "--checkpoint", "x.ckpt", "--output-dir", "{file}"],
     r"--output-dir \S+ is a file"),
    (["visualize", "--checkpoint", "x.ckpt", "--output-dir", "{under}"],
     r"--output-dir \S+ cannot be created"),
    (["check-data", "--data-dir", "{file}"], r"--data-dir \S+ is a file"),
    (["check-data", "--img-dir", "{file}"], r"--img-dir \S+ is a file"),
    (["cache-features", "tiny", "--data-dir", "{file}"], r"--data-dir \S+ is a file"),
    (["cache-features", "tiny", "feature_cache.dir={file}"],
     r"feature cache folder \S+ is a file.*feature_cache.mode=off"),
    (["train", "tiny", "feature_cache.mode=build", "feature_cache.dir={under}"],
     r"feature cache folder \S+ cannot be created"),
    (["rerun", "some-trial", "--log-dir", "{file}"], r"--log-dir \S+ is a file"),
    (["sweep", "quickstart", "storage={file}"], r"storage \S+ is a file, not a folder"),
    (["sweep", "quickstart", "storage={proc}"], r"storage \S+ cannot be used"),
    (["sweep", "quickstart", "data_dir={file}"], r"data_dir \S+ is a file"),
    (["sweep", "quickstart", "mlflow.tracking_uri=sqlite:///{under}/mlflow.db"],
     r"mlflow.tracking_uri's folder \S+ cannot be created"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_an_unusable_folder_is_one_line(argv: list[str], expected: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "afile").write_text("not a folder")
    names = {"file": str(tmp_path / "afile"), "under": str(tmp_path / "afile" / "sub"),
             "proc": "/proc/slotsweep-test"}
    before = sorted(tmp_path.rglob("*"))
    rc = main([arg.format(**names) for arg in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.search(expected, err), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, nothing generated
