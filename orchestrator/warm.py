"""``slotsweep up`` / ``slotsweep down``, and ``slotsweep sweep`` handing its work to the warm
server they start (the server itself, which runs the top-level command: dashboards.warm_server);
and the local Ray instance a sweep starts, whose trial takes an idle worker.

A sweep started from scratch spends ~14 s on a 2-core machine before its first trial trains:
the MLflow server, Ray's processes and the trial's process importing torch and Lightning. The
warm server has all three ready; ``slotsweep sweep`` here (same folder, same environment) sends
it the command line and prints what it prints, so the first step comes in a few seconds.

Protocol: one JSON object per line over the server's Unix socket. The client sends
``{"argv": [...], "key": {...}}``; the server answers ``{"accepted": pid}`` or
``{"refused": why}``, then ``{"out": text}`` / ``{"err": text}`` while the command runs and
``{"exit": code}`` at its end. The client sends ``{"signal": "SIGINT"}`` on Ctrl-C or SIGTERM
(the sweep stops as it would in the client's own process); a client that hangs up counts as
Ctrl-C. ``{"stop": true}`` asks an idle server to shut down.

No Ray, MLflow or torch at import: ``slotsweep sweep`` decides here, before any of them loads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.data.prepare import cache_root
from core.errors import SlotsweepError
from core.names import WARM_DIR_ENV

# What a sweep's result depends on besides its command line: where data, caches and MLflow
# stores are, which cluster and devices, how many threads. A request from an environment that
# differs in any of these runs in the client's own process instead.
KEY_PREFIXES = ("SLOTSWEEP_", "MLFLOW_", "RAY_", "TUNE_", "CUDA_", "NVIDIA_", "OMP_", "MKL_",
                "TORCH", "PL_", "AWS_", "GOOGLE_", "HF_", "PYTHONPATH", "VIRTUAL_ENV")
SOCKET = "sock"
PID_FILE = "server.json"
LOG_FILE = "server.log"
READY_TIMEOUT_S = 180.0
SERVING = False  # True in the warm server's own process


def state_dir() -> Path:
    """The warm server's folder: its socket, ``server.json`` and ``server.log``."""
    return Path(os.environ.get(WARM_DIR_ENV, cache_root() / "warm")).expanduser().resolve()


def key() -> dict[str, Any]:
    """What must match between a client and the server for the server to run its sweep."""
    env = {k: v for k, v in os.environ.items() if k.startswith(KEY_PREFIXES)}
    return {"cwd": os.getcwd(), "python": sys.executable, "env": env}


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The names of what differs between two :func:`key` values (empty: compatible)."""
    out = [k for k in ("cwd", "python") if mine[k] != theirs[k]]
    names = set(mine["env"]) | set(theirs["env"])
    return out + sorted(n for n in names if mine["env"].get(n) != theirs["env"].get(n))


def send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall((json.dumps(message) + "\n").encode())


def _connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # a socket left by a server that died
        conn.close()
        return None
    return conn


def forward(argv: list[str]) -> int | None:
    """Run ``slotsweep ARGV`` in the warm server and return its exit code; None when there is
    no server, or it is busy or set up for another folder or environment (one line says so):
    the caller then runs the command itself. Ctrl-C and SIGTERM go to the server's sweep."""
    folder = state_dir()
    conn = None if SERVING else _connect(folder / SOCKET)
    if conn is None:
        return None
    asked: list[str] = []

    def ask_stop(signum: int, frame: Any) -> None:
        asked.append(signal.Signals(signum).name)
        with contextlib.suppress(OSError):
            send(conn, {"signal": asked[-1]})

    previous = {s: signal.signal(s, ask_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with conn, conn.makefile("r", encoding="utf-8") as replies:
            try:
                send(conn, {"argv": argv, "key": key()})
                first = json.loads(replies.readline() or "{}")
            except (OSError, ValueError):
                first = {}
            if "accepted" in first:
                print(f"warm server (pid {first['accepted']}): Ray and MLflow are up",
                      flush=True)
                return _relay(replies, first["accepted"], folder)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if asked:  # Ctrl-C while the server was deciding
        raise KeyboardInterrupt
    print(f"slotsweep: the warm server in {folder} is not used: "
          f"{first.get('refused', 'it did not answer')}; running here", file=sys.stderr)
    return None


def _relay(replies: Any, pid: int, folder: Path) -> int:
    """Print what the server says until its exit code."""
    for line in replies:
        message = json.loads(line)
        if "exit" in message:
            return int(message["exit"])
        stream = sys.stdout if "out" in message else sys.stderr
        stream.write(message.get("out", message.get("err", "")))
        stream.flush()
    raise SlotsweepError(f"the warm server (pid {pid}) stopped in the middle of the command; "
                         f"its log: {folder / LOG_FILE}; `--resume` finishes an interrupted sweep")


def running() -> dict[str, Any] | None:
    """The running server's ``server.json`` (pid, key, MLflow URI), or None."""
    folder = state_dir()
    conn = _connect(folder / SOCKET)
    if conn is None:
        return None
    conn.close()
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / PID_FILE).read_text())
    return None


def up(idle_timeout_s: float) -> int:
    """Start the warm server (detached: it outlives this command) and wait until it is ready."""
    folder = state_dir()
    info = running()
    if info is not None:
        print(f"warm server already running (pid {info['pid']}, {folder}); "
              f"`slotsweep down` stops it")
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(folder / LOG_FILE, "wb") as log:  # this start's log only
        process = subprocess.Popen(
            [sys.executable, "-m", "dashboards.warm_server", str(folder), str(idle_timeout_s)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # Ctrl-C in this terminal later does not reach it
    while running() is None:
        if process.poll() is not None or time.monotonic() - start > READY_TIMEOUT_S:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            lines = (folder / LOG_FILE).read_text(errors="replace").strip().splitlines()
            why = [line for line in lines if line.startswith("error: ")][-1:] or lines[-1:]
            raise SlotsweepError(f"the warm server did not start ({'; '.join(why)}); its log: "
                                 f"{folder / LOG_FILE}")
        time.sleep(0.2)
    print(f"warm server ready in {time.monotonic() - start:.1f} s (pid {process.pid}; log "
          f"{folder / LOG_FILE}): `slotsweep sweep` from {os.getcwd()} now starts at once; "
          f"`slotsweep down` stops it (it stops itself after {idle_timeout_s / 60:g} idle "
          f"minutes)")
    return 0


def down(grace_s: float = 60.0) -> int:
    """Stop the warm server: at once when idle; a running sweep is stopped as by Ctrl-C."""
    folder = state_dir()
    info = running()
    if info is None:
        print(f"no warm server running ({folder})")
        return 0
    conn = _connect(folder / SOCKET)
    if conn is not None:
        with conn, contextlib.suppress(OSError):
            send(conn, {"stop": True})
            conn.recv(1024)
    pid = int(info["pid"])
    deadline = time.monotonic() + grace_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        print(f"warm server (pid {pid}) did not stop in {grace_s:g} s: killed", file=sys.stderr)
        return 1
    print(f"warm server (pid {pid}) stopped")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError, ValueError):  # a zombie child of this process
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


# What a trial's process imports before its first step (~6 s of CPU on a 2-core machine);
# Ray's ``preload_python_modules`` has every new worker import them before it takes work.
PRELOAD = ("torch", "pytorch_lightning", "ray.tune", "timm", "core.train", "core.training.trainer",
           "orchestrator.trial", "orchestrator.trial_callbacks", "orchestrator.trial_logger",
           "orchestrator.mlflow_runs")


def start_local_ray(preload: bool = False, **kwargs: Any) -> None:
    """A private Ray instance on this machine (``address="local"``: even beside a ``ray start``
    cluster, which RAY_ADDRESS=auto joins); with ``preload`` its workers import :data:`PRELOAD`
    as they start (the warm server's: each idle worker then holds ~1 GB, which a sweep that
    starts Ray for itself would pay without gaining, its trial starting as Ray does).

    Ray Tune gives each trial's actor a runtime environment ``{"env_vars": {"PL_DISABLE_FORK":
    "1"}}`` (ray.tune.execution.class_cache, Ray 2.60); Ray starts a fresh worker for an actor
    whose runtime environment differs from its idle workers', so the preloaded ones would sit
    unused. Setting the variable here instead (local workers inherit this process's
    environment) lets the trial take an idle worker whose imports are done."""
    import ray

    os.environ.setdefault("PL_DISABLE_FORK", "1")
    with contextlib.suppress(ImportError, AttributeError):  # another Ray: a cold worker, no harm
        from ray.tune.execution import class_cache

        if os.environ["PL_DISABLE_FORK"] == class_cache.DEFAULT_ENV_VARS.get("PL_DISABLE_FORK"):
            class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
             _system_config={"preload_python_modules": list(PRELOAD)} if preload else None,
             **kwargs)
