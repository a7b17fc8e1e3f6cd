"""The warm server that ``slotsweep up`` leaves running (its client, and the local Ray whose
workers import a trial's modules as they start: :mod:`orchestrator.warm`).

The server keeps one embedded MLflow server, one local Ray instance whose idle workers have
already imported torch, Lightning and the trial's code, and the driver's own imports. It runs
one ``slotsweep sweep`` at a time, in its main thread, exactly as the command would run in the
client's process (same parser, same code, its output sent to the client); another request
while it runs is refused and runs in its own process. After each sweep Ray is started afresh, so
the next sweep again finds idle workers that have imported everything: Ray never hands a
worker that has hosted an actor to the next one.

``python -m dashboards.warm_server FOLDER IDLE_TIMEOUT_S`` (what ``slotsweep up`` starts).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import queue
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from core.errors import SlotsweepError, one_line
from orchestrator.warm import PID_FILE, SOCKET, differences, key, send, start_local_ray


class _ToClient(io.TextIOBase):
    """A text stream whose writes go to the client as ``{"out": ...}`` or ``{"err": ...}``
    (Tune's callbacks and the report's thread write too: one lock). A client that has gone
    stops receiving; the command goes on until it stops."""

    def __init__(self, conn: socket.socket, kind: str, lock: threading.Lock) -> None:
        self.conn, self.kind, self.lock, self.gone = conn, kind, lock, False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self.lock:
            if text and not self.gone:
                try:
                    send(self.conn, {self.kind: text})
                except OSError:
                    self.gone = True
        return len(text)


class Server:
    def __init__(self, folder: Path, idle_timeout_s: float) -> None:
        self.folder, self.idle_timeout_s = folder, idle_timeout_s
        self.key = key()  # before anything below sets an environment variable
        self.requests: queue.Queue[tuple[socket.socket, list[str]] | None] = queue.Queue()
        self.busy = threading.Event()  # a sweep runs (or is claimed): others are refused
        self.claim = threading.Lock()
        self.stopping = threading.Event()

    def start(self) -> None:
        import ray.tune  # noqa: F401  what a sweep's driver imports, imported once here

        import dashboards.report  # noqa: F401
        from orchestrator import sweep, warm
        from orchestrator.mlflow_server import LocalServer, mlflow_root
        from orchestrator.ray_logs import quiet_ray

        warm.SERVING = True  # its sweeps run here, never handed on again
        sweep._quiet()
        quiet_ray()
        sweep.WARM_MLFLOW = LocalServer.start(mlflow_root())
        sweep.WARM_MLFLOW.keep_alive()
        _start_ray()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        (self.folder / SOCKET).unlink(missing_ok=True)
        self.listener.bind(str(self.folder / SOCKET))
        self.listener.listen(8)
        (self.folder / PID_FILE).write_text(json.dumps(
            {"pid": os.getpid(), "key": self.key, "mlflow": sweep.WARM_MLFLOW.uri}, indent=1))
        threading.Thread(target=self._accept, daemon=True, name="warm-accept").start()
        print(f"ray: ready; pid {os.getpid()}, MLflow {sweep.WARM_MLFLOW.uri}", flush=True)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._greet, args=(conn,), daemon=True).start()

    def _greet(self, conn: socket.socket) -> None:
        """Read one request: queue a sweep, refuse what cannot run here, or stop."""
        try:
            with conn.makefile("r", encoding="utf-8") as lines:
                request = json.loads(lines.readline() or "{}")
        except (OSError, ValueError):
            conn.close()
            return
        if request.get("stop"):
            self.stopping.set()
            if self.busy.is_set():  # `slotsweep down` during a sweep: Ctrl-C for it first
                os.kill(os.getpid(), signal.SIGINT)
            self.requests.put(None)
            with contextlib.suppress(OSError):
                send(conn, {"stopping": True})
            conn.close()
            return
        with self.claim:  # two clients at once: one runs, the other is told
            why = None
            if "argv" not in request or "key" not in request:
                why = "not a request"
            elif self.busy.is_set() or self.stopping.is_set():
                why = "it is running another sweep"
            elif diff := differences(self.key, request["key"]):
                why = (f"it was started with another {', '.join(diff[:4])} (`slotsweep down`, "
                       f"then `slotsweep up` here)")
            else:
                self.busy.set()
        if why is not None:
            with contextlib.suppress(OSError):
                send(conn, {"refused": why})
            conn.close()
            return
        self.requests.put((conn, list(request["argv"])))

    def serve(self) -> None:
        """Run queued sweeps in this (the main) thread until stopped or idle too long."""
        while not self.stopping.is_set():
            try:
                item = self.requests.get(timeout=self.idle_timeout_s)
            except queue.Empty:
                print(f"idle for {self.idle_timeout_s:g} s: stopping", flush=True)
                return
            if item is None:
                return
            conn, argv = item
            try:
                self._run(conn, argv)
            finally:
                conn.close()
                self.busy.clear()  # a request from now on waits for Ray, then runs
            if not self.stopping.is_set():
                self._fresh_ray()

    def _run(self, conn: socket.socket, argv: list[str]) -> None:
        from dashboards.cli import main

        lock = threading.Lock()
        out, err = _ToClient(conn, "out", lock), _ToClient(conn, "err", lock)
        done = threading.Event()
        threading.Thread(target=self._listen, args=(conn, done), daemon=True).start()
        send(conn, {"accepted": os.getpid()})
        print(f"sweep: {' '.join(argv)}", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the client's process
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                    _log_streams_to(err):
                code = main(argv)
        except SystemExit as exc:  # argparse's own exit (a usage error)
            code = exc.code if isinstance(exc.code, int) else 2
        except KeyboardInterrupt:  # Ctrl-C before the command's own handler was in place
            code = 130
        finally:
            done.set()
            signal.signal(signal.SIGINT, _ignore_between_sweeps)
        print(f"exit {code}", flush=True)
        with contextlib.suppress(OSError):
            send(conn, {"exit": code})

    def _listen(self, conn: socket.socket, done: threading.Event) -> None:
        """The client's Ctrl-C or SIGTERM, or its hanging up: Ctrl-C for the running sweep
        (Tune's handler stops it as it stops a sweep in the client's own process)."""
        with contextlib.suppress(OSError, ValueError), conn.makefile("r") as lines:
            for line in lines:
                if "signal" in json.loads(line) and not done.is_set():
                    os.kill(os.getpid(), signal.SIGINT)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGINT)

    def _fresh_ray(self) -> None:
        import ray

        ray.shutdown()
        _start_ray()
        print("ray: ready", flush=True)

    def close(self) -> None:
        import ray

        from orchestrator import sweep

        self.stopping.set()
        with contextlib.suppress(OSError, AttributeError):
            self.listener.close()
        (self.folder / SOCKET).unlink(missing_ok=True)
        (self.folder / PID_FILE).unlink(missing_ok=True)
        ray.shutdown()
        if sweep.WARM_MLFLOW is not None:
            sweep.WARM_MLFLOW.stop()
        print("stopped", flush=True)


@contextlib.contextmanager
def _log_streams_to(stream: Any) -> Any:
    """Log lines a sweep shows its user (Ray's, Tune's: a failed trial's reason) go to the
    client while its command runs, then back to the server's log."""
    handlers = [h for name in (None, "ray", "ray.tune") for h in logging.getLogger(name).handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    before = [h.setStream(stream) for h in handlers]
    try:
        yield
    finally:
        for handler, old in zip(handlers, before, strict=True):
            handler.setStream(old)


def _start_ray() -> None:
    """The server's Ray: idle workers that have imported what a trial imports."""
    start_local_ray(preload=True, log_to_driver=False, logging_level=logging.WARNING)


def _ignore_between_sweeps(signum: int, frame: Any) -> None:
    """Ctrl-C meant for a sweep that ended just before it arrived: nothing to stop."""


def main(folder: str, idle_timeout_s: str) -> int:
    server = Server(Path(folder), float(idle_timeout_s))
    signal.signal(signal.SIGINT, _ignore_between_sweeps)  # a sweep's command installs its own
    signal.signal(signal.SIGTERM, lambda *_: (server.stopping.set(), server.requests.put(None)))
    try:
        server.start()
        server.serve()
    except (SlotsweepError, OSError) as exc:  # `slotsweep up` shows this last line
        print(f"error: {one_line(exc)}", flush=True)
        return 2
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
