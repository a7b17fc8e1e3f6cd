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


def _finish(driver: subprocess.Popen, log: Path, timeout: float = 900) -> str:
    """Wait for the sweep to end well; assert it left no process; return its output."""
    children = descendants(driver.pid)
    rc = driver.wait(timeout=timeout)
    _no_orphans(children)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    return text


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
    with log.open("w") as out:  # SIGINT at its default, as in a terminal (see test_train.py)
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path),
                                  cwd=tmp_path,
                                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
    assert "--resume" in text and "Tuner.restore" not in text  # slotsweep's command only
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



@pytest.mark.slow
def test_a_full_disk_fails_the_trial_and_resume_continues_it(tmp_path):
    """ENOSPC while trial 0 writes its step-8 checkpoint (injected at the write call): the trial
    fails with the one-line reason, its step-4 checkpoint is whole and no partial file is left;
    once there is space, --resume continues it from step 4 (not from scratch) to the end."""
    from core.training.checkpoint import read_checkpoint

    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "quickstart", "name=full",
           f"storage={tmp_path / 'storage'}", "trials=2", "trainer.max_steps=12",
           "max_failures=0"]
    env = {**_env(tmp_path), "SLOTSWEEP_INJECT_FAULT": "enospc:0:8"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Traceback" not in first.stderr, first.stderr[-3000:]  # Tune's, cut to one line
    failure = [ln for ln in first.stderr.splitlines() if "Trial task failed" in ln]
    assert len(failure) == 1 and "could not write checkpoint" in failure[0], first.stderr[-3000:]
    reason = [ln for ln in first.stdout.splitlines() if " failed: could not write checkpoint" in ln]
    assert len(reason) == 1 and "(No space left on device)" in reason[0], first.stdout[-3000:]
    assert "1 trial(s) failed" in first.stdout and "--resume" in first.stdout
    record = json.loads((tmp_path / "storage" / "full" / "best.json").read_text())
    states = {t["trial_id"].rsplit("_", 1)[1]: t for t in record["trials"]}
    assert states["00000"]["state"] == "FAILED", states
    assert states["00001"]["state"] == "DONE", states
    ckpts = Path(states["00000"]["run_dir"]) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step=*")) == ["step=4.ckpt"]
    assert not list(ckpts.glob(".*tmp"))  # no partial write left
    assert read_checkpoint(ckpts / "step=4.ckpt")["global_step"] == 4
    kept = (ckpts / "step=4.ckpt").stat().st_mtime_ns

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True,
                             env=_env(tmp_path), cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = json.loads((tmp_path / "storage" / "full" / "best.json").read_text())
    assert record["complete"] is True
    assert [t["state"] for t in record["trials"]] == ["DONE", "DONE"], record["trials"]
    assert (ckpts / "step=12.ckpt").is_file()
    assert (ckpts / "step=4.ckpt").stat().st_mtime_ns == kept  # continued, not retrained


def test_a_second_sweep_of_the_same_name_is_refused(tmp_path, monkeypatch, capsys):
    """While a driver runs sweep `twin`, another `slotsweep sweep ... name=twin` stops in one line
    before starting Ray or MLflow, and touches nothing of the first; a killed driver's lock is
    free again (flock dies with its process), so --resume after a crash works."""
    import ray

    from orchestrator.cli import main
    from orchestrator.sweep_control import sweep_lock

    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "storage"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from orchestrator.sweep_control import sweep_lock\n"
         "with sweep_lock(Path(sys.argv[1])):\n"
         "    print('held', flush=True)\n    time.sleep(300)\n",
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
    from orchestrator.trial import newest_checkpoint

    cfg = load_config("tiny", ["trainer.max_steps=4", "trainer.checkpoint_every=2",
                               "trainer.val_check_interval=2", "dataset.batch_size=2"])
    train(cfg, run_dir=tmp_path / "run", progress_bar=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert newest_checkpoint(tmp_path / "run", None) == ckpts / "step=4.ckpt"
    data = (ckpts / "step=4.ckpt").read_bytes()
    (ckpts / "step=4.ckpt").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    assert newest_checkpoint(tmp_path / "run", None) == ckpts / "step=2.ckpt"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slotsweep: warning: skipping checkpoint ")
    assert "step=4.ckpt is corrupt" in err[0]


def _mlflow_server_pids(driver_pid: int) -> set[int]:
    found = set()
    for pid in descendants(driver_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mlflow" in cmd and b"server" in cmd:
            found.add(pid)
    return found


def _series_complete(uri: str, record: dict) -> None:
    """Every trial's run holds val/ari at 4, 8 and 12 once, and train/loss with no step twice."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    for t in record["trials"]:
        run = t["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run, "val/ari")] == [4, 8, 12], t
        steps = [m.step for m in client.get_metric_history(run, "train/loss")]
        assert len(steps) == len(set(steps)) and max(steps) == 12, steps
        assert client.get_run(run).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "external"])
def test_the_mlflow_server_dies_mid_sweep_and_comes_back(tmp_path, where):
    """Trials go on training while the server is away; what they could not log arrives when it
    is back (the embedded server is started again by the sweep, an external one by its owner)."""
    from orchestrator.mlflow_server import LocalServer

    storage = tmp_path / "storage"
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "quickstart", "name=down",
           f"storage={storage}", "trials=2", "trainer.max_steps=12"]
    external = None
    if where == "external":
        external = LocalServer.start(tmp_path / "external")
        cmd.append(f"mlflow.tracking_uri={external.uri}")
    log = tmp_path / "sweep.log"
    try:
        with log.open("w") as out:
            driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      env=_env(tmp_path), cwd=tmp_path)
        trials = storage / "down" / "trials"
        _wait_for(lambda: any(trials.glob("*/checkpoints/step=4.ckpt")), 300, "first checkpoint",
                  driver, log)
        if external is not None:
            external.stop()
        else:
            (server,) = _mlflow_server_pids(driver.pid)
            os.killpg(server, signal.SIGKILL)
        # training goes on while the server is away
        _wait_for(lambda: any(trials.glob("*/checkpoints/step=8.ckpt")), 300,
                  "a checkpoint while MLflow was down", driver, log)
        if external is not None:
            external = LocalServer.start(tmp_path / "external", port=external.port)
        text = _finish(driver, log)
        record = json.loads((storage / "down" / "best.json").read_text())
        assert record["complete"] and all(t["state"] == "DONE" for t in record["trials"])
        assert not list(trials.glob(f"*/{'mlflow_unsent.json'}"))
        if external is not None:
            _series_complete(external.uri, record)
        else:
            assert "starting it again" in text and "answers again" in text
            with LocalServer.start(tmp_path / "mlflow") as srv:
                _series_complete(srv.uri, record)
    finally:
        if external is not None:
            external.stop()


@pytest.mark.slow
def test_a_sweep_whose_mlflow_server_never_returns_says_what_is_missing(tmp_path):
    """The server goes for good: the trials finish, the sweep ends (exit 1) with one line naming
    the runs and what they miss; best.json and checkpoints are on disk, the values kept."""
    from orchestrator.mlflow_server import LocalServer

    storage = tmp_path / "storage"
    external = LocalServer.start(tmp_path / "external")
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "quickstart", "name=gone",
           f"storage={storage}", "trials=2", "trainer.max_steps=12",
           f"mlflow.tracking_uri={external.uri}"]
    log = tmp_path / "sweep.log"
    with log.open("w") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(tmp_path),
                                  cwd=tmp_path)
    trials = storage / "gone" / "trials"
    _wait_for(lambda: any(trials.glob("*/checkpoints/step=4.ckpt")), 300, "first checkpoint",
              driver, log)
    external.stop()
    children = descendants(driver.pid)
    rc = driver.wait(timeout=600)
    text = log.read_text()
    assert rc == 1, text[-3000:]
    (line,) = [x for x in text.splitlines() if x.startswith(f"slotsweep: MLflow at {external.uri}")]
    record = json.loads((storage / "gone" / "best.json").read_text())
    for t in record["trials"]:
        assert t["state"] == "DONE" and t["checkpoint"], t
        assert f"for run {t['mlflow_run_id']} (trial {t['trial_id']})" in line, line
        assert (Path(t["run_dir"]) / "mlflow_unsent.json").is_file()
    assert "metric values (steps" in line and "best.json" in line
    _no_orphans(children)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "ddp"])
def test_a_killed_trial_process_is_restarted_from_its_checkpoint(tmp_path, kind):
    """SIGKILL to a trial's training process (a DDP trial's rank 0 for `ddp`), not the driver:
    Tune restarts the trial from its last checkpoint, it finishes in its one MLflow run, and the
    run's series has every step once (no gap, no duplicate)."""
    from mlflow import MlflowClient
    from mlflow_runs import sweep_runs

    from orchestrator.mlflow_server import LocalServer

    storage = tmp_path / "storage"
    extra = (["trials=1", "concurrency=1", "resources.workers=2"] if kind == "ddp"
             else ["trials=2"])
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", "quickstart", "name=kill",
           f"storage={storage}", "trainer.max_steps=12", *extra]
    log = tmp_path / "sweep.log"
    # trial 0 holds still once after writing step=4.ckpt, so the kill lands between checkpoints
    # however fast or slow the machine is (racing a running trial missed the window on CI)
    env = {**_env(tmp_path), "SLOTSWEEP_INJECT_FAULT": "hold:0:4"}
    with log.open("w") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=tmp_path)
    trials = storage / "kill" / "trials"

    def held() -> list[Path]:
        return [p.parent for p in trials.glob("*/.fault-raised")
                if (p.parent / "checkpoints" / "step=4.ckpt").is_file()]

    _wait_for(lambda: bool(held()), 300, "a trial held at step 4", driver, log)
    victim = held()[0]
    assert not (victim / "checkpoints" / "step=8.ckpt").exists()
    os.kill(json.loads((victim / "trial.json").read_text())["pid"], signal.SIGKILL)
    text = _finish(driver, log)
    record = json.loads((storage / "kill" / "best.json").read_text())
    assert record["complete"] and all(t["state"] == "DONE" for t in record["trials"]), text[-3000:]
    assert (victim / "checkpoints" / "step=12.ckpt").is_file()
    with LocalServer.start(tmp_path / "mlflow") as srv:
        _, children = sweep_runs(srv.uri, "quickstart")
        assert len(children) == len(record["trials"])  # one run per trial, the killed one too
        client = MlflowClient(srv.uri)
        for t in record["trials"]:
            run = t["mlflow_run_id"]
            assert [m.step for m in client.get_metric_history(run, "val/ari")] == [4, 8, 12]
            steps = [m.step for m in client.get_metric_history(run, "train/loss")]
            assert sorted(steps) == list(range(1, 13)), steps
