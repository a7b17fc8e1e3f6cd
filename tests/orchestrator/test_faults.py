"""Faults a real cluster produces, survived with nothing lost: each scenario runs the real
command (a local Ray instance, the embedded MLflow server) and asserts that no process of it is
left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive, descendants

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "SLOTSWEEP_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "SLOTSWEEP_CACHE": str(tmp_path.parent / "faults-cache")}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.2)


def _no_orphans(pids: set[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive(pids)
    for pid in left:  # do not leak them into the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind: {sorted(left)}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_sweep_and_resume_finishes_it(tmp_path, sig):
    """Ctrl-C or SIGTERM mid-sweep: stops within 30 s, says it is partial and how to finish it,
    leaves no process; --resume finishes every trial without retraining one from scratch."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "quickstart", "name=sig",
           f"storage={tmp_path / 'storage'}", "trials=2", "trainer.max_steps=12"]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path),
                                  cwd=tmp_path)
    trials = tmp_path / "storage" / "sig" / "trials"
    _wait_for(lambda: any(trials.glob("*/checkpoints/step=4.ckpt")), 300, "first checkpoint",
              driver, log)
    kept = {p: p.stat().st_mtime_ns for p in trials.glob("*/checkpoints/step=4.ckpt")}
    children = descendants(driver.pid)
    start = time.monotonic()
    driver.send_signal(sig)
    rc = driver.wait(timeout=120)
    took = time.monotonic() - start
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert took < 30, f"took {took:.0f} s to stop"
    assert "sweep interrupted" in text and "sweep quickstart name=sig" in text, text[-3000:]
    assert "--resume" in text and "Tuner.restore" not in text.split("sweep interrupted")[-1]
    record = json.loads((tmp_path / "storage" / "sig" / "best.json").read_text())
    assert record["complete"] is False and record["trials_planned"] == 2
    _no_orphans(children)

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True,
                             env=_env(tmp_path), cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = json.loads((tmp_path / "storage" / "sig" / "best.json").read_text())
    assert record["complete"] is True and len(record["trials"]) == 2
    assert all(t["state"] == "DONE" and t["metrics"].get("val/ari") is not None
               for t in record["trials"]), record["trials"]
    assert record["best"] is not None
    for path, mtime in kept.items():  # continued from its checkpoint, not retrained
        assert path.stat().st_mtime_ns == mtime, path


def test_a_second_sweep_of_the_same_name_is_refused(tmp_path, monkeypatch, capsys):
    """While a driver runs sweep `twin`, another `slotsweep sweep ... name=twin` stops in one line
    before starting Ray or MLflow, and touches nothing of the first; a killed driver's lock is
    free again (flock dies with its process), so --resume after a crash works."""
    import ray

    from orchestrator.cli import main
    from orchestrator.sweep import sweep_lock

    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "storage"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from orchestrator.sweep import sweep_lock\n"
         "with sweep_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(300)\n",
         str(storage / "twin")], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        rc = main(["sweep", "quickstart", "name=twin", f"storage={storage}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert f"sweep twin is already running (pid {holder.pid};" in err, err
        assert "pick another name" in err
        assert not ray.is_initialized()
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    with sweep_lock(storage / "twin"):  # the killed holder's lock is free
        pass


def test_a_resumed_trial_skips_a_truncated_checkpoint(tmp_path, monkeypatch, capsys):
    """A crash left the newest step file cut short: the trial continues from the one before
    it, with one warning line, instead of failing on every retry."""
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path / "cache"))
    from core.config import load_config
    from core.train import train
    from orchestrator.trial import _newest_checkpoint

    cfg = load_config("tiny", ["trainer.max_steps=4", "trainer.checkpoint_every=2",
                               "trainer.val_check_interval=2", "dataset.batch_size=2"])
    train(cfg, run_dir=tmp_path / "run", progress_bar=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert _newest_checkpoint(tmp_path / "run", None) == ckpts / "step=4.ckpt"
    data = (ckpts / "step=4.ckpt").read_bytes()
    (ckpts / "step=4.ckpt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert _newest_checkpoint(tmp_path / "run", None) == ckpts / "step=2.ckpt"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slotsweep: warning: skipping checkpoint ")
    assert "step=4.ckpt is corrupt" in err[0]
