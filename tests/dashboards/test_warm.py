"""The warm server (`slotsweep up` / `down`) and `slotsweep sweep` handing its work to it.

The client's side is tested against a scripted server on a real Unix socket (fast); the whole
path, with a real server, Ray, MLflow and trials, in the slow test at the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import alive, descendants

from core.errors import SlotsweepError
from core.names import WARM_DIR_ENV
from orchestrator import warm as warm_client
from orchestrator.warm import differences, forward, key


@pytest.fixture
def folder(tmp_path, monkeypatch):
    path = Path(f"/tmp/sw-warm-{os.getpid()}-{time.monotonic_ns()}")  # short: AF_UNIX paths
    path.mkdir()
    monkeypatch.setenv(WARM_DIR_ENV, str(path))
    yield path
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def _scripted(folder: Path, script) -> threading.Thread:
    """A server on ``folder``'s socket that accepts one client and runs ``script(conn, lines,
    request)``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(folder / warm_client.SOCKET))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("r") as lines:
            script(conn, lines, json.loads(lines.readline()))
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_without_a_server_the_sweep_runs_here(folder):
    assert forward(["sweep", "quickstart"]) is None
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a dead server's socket file
    stale.bind(str(folder / warm_client.SOCKET))
    stale.close()
    assert forward(["sweep", "quickstart"]) is None
    assert warm_client.running() is None


def test_the_key_names_what_differs(monkeypatch, tmp_path):
    mine = key()
    assert differences(mine, key()) == []
    monkeypatch.setenv("SLOTSWEEP_CACHE", "/elsewhere")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME_IS_NOT_PART_OF_IT", "x")
    assert differences(mine, key()) == ["cwd", "SLOTSWEEP_CACHE"]


def test_the_client_prints_what_the_server_says_and_sends_it_ctrl_c(folder, capsys):
    seen = {}

    def script(conn, lines, request):
        seen["request"] = request
        warm_client.send(conn, {"accepted": 4242})
        warm_client.send(conn, {"out": "sweep s: table\n"})
        warm_client.send(conn, {"err": "slotsweep: warning: w\n"})
        os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, in the client's process
        seen["signal"] = json.loads(lines.readline())
        warm_client.send(conn, {"exit": 130})

    thread = _scripted(folder, script)
    before = signal.getsignal(signal.SIGINT)  # (an earlier in-process sweep may leave Tune's)
    assert forward(["sweep", "quickstart", "trials=2"]) == 130
    thread.join(5)
    assert seen["request"]["argv"] == ["sweep", "quickstart", "trials=2"]
    assert differences(seen["request"]["key"], key()) == []
    assert seen["signal"] == {"signal": "SIGINT"}
    out, err = capsys.readouterr()
    assert out == "warm server (pid 4242): Ray and MLflow are up\nsweep s: table\n"
    assert err == "slotsweep: warning: w\n"
    assert signal.getsignal(signal.SIGINT) is before  # the handler given back


def test_a_refusal_is_one_line_and_the_sweep_runs_here(folder, capsys):
    thread = _scripted(folder, lambda conn, lines, request: warm_client.send(
        conn, {"refused": "it is running another sweep"}))
    assert forward(["sweep", "quickstart"]) is None
    thread.join(5)
    err = capsys.readouterr().err
    assert err == (f"slotsweep: the warm server in {folder} is not used: it is running another "
                   f"sweep; running here\n")


def test_a_server_that_dies_mid_command_is_one_line(folder):
    def script(conn, lines, request):
        warm_client.send(conn, {"accepted": 4242})
        warm_client.send(conn, {"out": "half a table\n"})

    thread = _scripted(folder, script)
    with pytest.raises(SlotsweepError, match=r"warm server \(pid 4242\) stopped in the middle.*"
                       r"--resume"):
        forward(["sweep", "quickstart"])
    thread.join(5)


def _slotsweep(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600,
               **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dashboards.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def test_bad_up_and_down_are_one_line(folder, tmp_path):
    env = {**os.environ}
    bad = _slotsweep("up", "--idle-minutes", "0", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--idle-minutes must be positive" in bad.stderr
    none = _slotsweep("down", env=env, cwd=tmp_path)
    assert none.returncode == 0 and none.stdout == f"no warm server running ({folder})\n"


@pytest.mark.slow
def test_up_then_sweeps_in_the_server_ctrl_c_resume_and_down(folder, tmp_path):
    """Real server: a sweep runs in it and prints what it prints on its own; Ctrl-C on the
    client stops it (exit 130, partial) and --resume finishes it there; a sweep from another
    folder runs on its own with one line; `down` stops a running sweep as Ctrl-C does and
    leaves no process; a failing `up` is one line."""
    env = {**os.environ, "SLOTSWEEP_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "SLOTSWEEP_CACHE": str(tmp_path.parent / "warm-cache")}
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(name, None)
    started = _slotsweep("up", env=env, cwd=tmp_path)
    assert started.returncode == 0 and "warm server ready in" in started.stdout, started.stderr
    pid = json.loads((folder / warm_client.PID_FILE).read_text())["pid"]
    try:
        _use_the_server(folder, tmp_path, env, pid)
    finally:  # a failed assertion must not leave the server running for the next tests
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)

    (tmp_path / "a-file").write_text("")
    failed = _slotsweep("up", env={**env, "SLOTSWEEP_MLFLOW_DIR": str(tmp_path / "a-file")},
                        cwd=tmp_path)
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert "the warm server did not start" in failed.stderr


def _long_sweep(name: str, sweep: list[str], env: dict[str, str],
                tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A 400-step sweep started as a client, once its trial has written its first checkpoint."""
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        client = subprocess.Popen(
            [sys.executable, "-m", "dashboards.cli", *sweep, f"name={name}",
             "trainer.max_steps=400"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    trials = tmp_path / "storage" / name / "trials"
    deadline = time.monotonic() + 300
    while not any(trials.glob("*/checkpoints/step=4.ckpt")):
        assert client.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return client, log


def _use_the_server(folder: Path, tmp_path: Path, env: dict[str, str], pid: int) -> None:
    again = _slotsweep("up", env=env, cwd=tmp_path)
    assert again.returncode == 0 and f"already running (pid {pid}" in again.stdout
    sweep = ["sweep", "quickstart", f"storage={tmp_path / 'storage'}", "trials=1", "--no-report"]

    done = _slotsweep(*sweep, "name=one", "trainer.max_steps=4", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith(f"warm server (pid {pid}): Ray and MLflow are up\n")
    assert "\nsweep one: " in done.stdout
    assert "\nbest: trial " in done.stdout and "Traceback" not in done.stderr
    record = json.loads((tmp_path / "storage" / "one" / "best.json").read_text())
    assert record["complete"] is True and record["best"]["step"] == 4
    assert record["mlflow"]["embedded_store"] == str(tmp_path / "mlflow")

    client, log = _long_sweep("cut", sweep, env, tmp_path)
    checkpoints = tmp_path / "storage" / "cut" / "trials"
    start = time.monotonic()
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=120) == 130, log.read_text()[-3000:]
    assert time.monotonic() - start < 30
    assert "sweep interrupted" in log.read_text()
    assert json.loads((checkpoints.parent / "best.json").read_text())["complete"] is False
    resumed = _slotsweep(*sweep, "name=cut", "trainer.max_steps=8", "--resume", env=env,
                         cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.startswith(f"warm server (pid {pid})")
    assert json.loads((checkpoints.parent / "best.json").read_text())["complete"] is True

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    alone = _slotsweep(*sweep, "name=alone", "trainer.max_steps=4", env=env, cwd=elsewhere)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    assert "is not used: it was started with another cwd" in alone.stderr
    assert "warm server (pid" not in alone.stdout

    # `slotsweep down` while the server runs a sweep: the sweep stops as by Ctrl-C
    client, log = _long_sweep("last", sweep, env, tmp_path)
    server_processes = descendants(pid) | {pid}
    stopped = _slotsweep("down", env=env, cwd=tmp_path)
    assert stopped.returncode == 0 and stopped.stdout == f"warm server (pid {pid}) stopped\n"
    assert client.wait(timeout=60) == 130, log.read_text()[-3000:]
    assert "sweep interrupted" in log.read_text()
    deadline = time.monotonic() + 15
    while alive(server_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(server_processes), "processes left behind"
    assert not (folder / warm_client.SOCKET).exists()


def test_local_ray_lets_a_trial_take_an_idle_preloaded_worker(monkeypatch):
    """Tune gives trial actors the runtime env {"env_vars": {"PL_DISABLE_FORK": "1"}}; Ray then
    starts a fresh worker instead of an idle one. start_local_ray sets the variable in the
    driver (workers inherit it) and drops it from Tune's actor env; with ``preload``, every
    listed module exists (Ray would only log a failed preload)."""
    import importlib

    import ray
    from ray.tune.execution import class_cache

    from orchestrator import warm

    monkeypatch.delenv("PL_DISABLE_FORK", raising=False)
    monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", {"PL_DISABLE_FORK": "1"})
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    warm.start_local_ray(preload=True, log_to_driver=False)
    assert os.environ["PL_DISABLE_FORK"] == "1" and class_cache.DEFAULT_ENV_VARS == {}
    assert calls[0]["address"] == "local" and calls[0]["log_to_driver"] is False
    assert calls[0]["_system_config"] == {"preload_python_modules": list(warm.PRELOAD)}
    for module in warm.PRELOAD:
        importlib.import_module(module)
    warm.start_local_ray()
    assert calls[1]["_system_config"] is None
