"""The MLflow server a sweep talks to: a private one (:class:`LocalServer`, SQLite + artifacts
under :func:`mlflow_root`) when no tracking URI is configured, and the checks a configured URI
must pass before a sweep starts (:func:`check_tracking_uri`, :func:`resolve_tracking_uri`)."""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from core.errors import SlotsweepError
from core.names import MLFLOW_DIR_ENV, TRACKING_URI_ENV

_DB_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores (optionally "+driver")
_HTTP_ERRORS = (OSError, ValueError, http.client.HTTPException)  # urllib's, bad URLs too
_LOG_MARK = "--- slotsweep: starting mlflow server"
_ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception)\b|\bERROR\b")


def _urlopen(url: str, timeout: float, headers: dict[str, str] | None = None):
    """GET without proxies for the loopback (a proxy cannot reach our 127.0.0.1)."""
    request = urllib.request.Request(url, headers=headers or {})
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> Any:
    """A ``preexec_fn``: SIGTERM the child when the thread that started it dies (Linux only).
    libc is loaded here, in the parent: no dlopen between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class LocalServer:
    """A private ``mlflow server`` (SQLite + proxied artifacts under ``root``) on 127.0.0.1.

    It runs in its own process group and gets SIGTERM when the thread that started it dies, even
    by SIGKILL (``PR_SET_PDEATHSIG``): start it from the main thread. MLflow's job runner (GenAI
    jobs: seven huey processes that survive a SIGTERM) is off unless
    ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION`` is set.
    """

    def __init__(self, root: Path, port: int, process: subprocess.Popen) -> None:
        self.root, self.port, self.process = root, port, process
        self.uri, self.pid = f"http://127.0.0.1:{port}", process.pid
        self._stopping: threading.Event | None = None

    @classmethod
    def start(cls, root: Path, port: int | None = None, timeout: float = 90,
              wait: bool = True) -> LocalServer:
        """Start a server and wait until ``/health`` answers (SlotsweepError when it does not);
        ``wait=False`` returns at once: call :meth:`wait_ready` before using it (a sweep starts
        Ray meanwhile)."""
        root = Path(root).expanduser().resolve()
        (root / "artifacts").mkdir(parents=True, exist_ok=True)
        if port is None:
            port = _free_port()
        else:  # else /health may answer from another server while ours fails to bind
            with socket.socket() as sock:
                # as the server binds: a port left in TIME_WAIT by a server that died is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError as exc:
                    raise SlotsweepError(f"port {port} on 127.0.0.1 is not free ({exc.strerror}): "
                                         "pick another port or leave it out") from None
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        with open(root / "server.log", "a") as log:
            log.write(f"{_LOG_MARK} on port {port}\n")
            log.flush()
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent(), cwd=root)
        server = cls(root, port, process)
        if wait:
            server.wait_ready(timeout)
        return server

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until ``/health`` answers; stop it and raise SlotsweepError when it does not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise SlotsweepError(f"MLflow server in {self.root} exited with code "
                                     f"{self.process.returncode}: {self.last_log_line()}")
            with contextlib.suppress(*_HTTP_ERRORS), _urlopen(f"{self.uri}/health", 2) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.25)
        self.stop()
        raise SlotsweepError(f"MLflow server in {self.root} did not answer on {self.uri} within "
                             f"{timeout:.0f} s: {self.last_log_line()}")

    def last_log_line(self) -> str:
        """The last error line of this start in ``server.log``, else its last line."""
        try:
            text = (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return "no server.log"
        lines = [line.strip() for line in text.rsplit(_LOG_MARK, 1)[-1].splitlines()[1:]]
        errors = [line for line in lines if _ERROR_LINE.search(line)]
        last = (errors or [line for line in lines if line] or ["no output yet"])[-1]
        return f"{last[:300]} (see {self.root / 'server.log'})"

    def keep_alive(self, check_s: float = 1.0, attempts: int = 30) -> None:
        """Start the server again (same store, same port) whenever it dies, until :meth:`stop`.

        Trials keep their MLflow calls while it is away and send them when it answers again.
        The watching thread starts the new server, so ``PR_SET_PDEATHSIG`` ties the server to a
        thread that lives until :meth:`stop`."""
        self._stopping = stopping = threading.Event()

        def watch() -> None:
            while not stopping.wait(check_s):
                if self.process.poll() is None:
                    continue
                print(f"slotsweep: warning: the MLflow server (pid {self.pid}) exited with code "
                      f"{self.process.returncode}: starting it again on {self.uri}",
                      file=sys.stderr, flush=True)
                for _ in range(attempts):
                    if stopping.is_set():
                        return
                    try:
                        fresh = LocalServer.start(self.root, self.port)
                    except SlotsweepError:
                        time.sleep(2)
                        continue
                    if stopping.is_set():  # stop() came while it was starting
                        fresh.stop()
                        return
                    self.process, self.pid = fresh.process, fresh.pid
                    print(f"slotsweep: the MLflow server answers again on {self.uri}",
                          file=sys.stderr, flush=True)
                    break

        threading.Thread(target=watch, daemon=True, name="mlflow-watch").start()

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
        if self._stopping is not None:
            self._stopping.set()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mlflow_root() -> Path:
    """Where the embedded MLflow server keeps its SQLite store and artifacts."""
    return Path(os.environ.get(MLFLOW_DIR_ENV, Path.cwd() / "runs" / "mlflow")).resolve()


def _login(uri: str) -> dict[str, str] | None:
    """The Authorization header MLflow's client sends to ``uri`` (from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD, ``~/.mlflow/credentials`` or MLFLOW_TRACKING_TOKEN, as
    ``mlflow.utils.rest_utils`` does): ``{}`` for none, None when the client signs its requests
    another way (AWS SigV4, an auth plugin), which only the client itself can reproduce."""
    import base64

    from mlflow.utils.credentials import get_default_host_creds

    creds = get_default_host_creds(uri)
    if creds.aws_sigv4 or creds.auth:
        return None
    if creds.username and creds.password:
        pair = base64.standard_b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {"Authorization": f"Bearer {creds.token}"} if creds.token else {}


def _refused(uri: str, code: int, login: dict[str, str]) -> str:
    from mlflow.environment_variables import (
        MLFLOW_TRACKING_PASSWORD,
        MLFLOW_TRACKING_TOKEN,
        MLFLOW_TRACKING_USERNAME,
    )

    names = f"{MLFLOW_TRACKING_USERNAME.name} / {MLFLOW_TRACKING_PASSWORD.name}"
    sent = login.get("Authorization", "")
    if sent.startswith("Bearer "):
        names = MLFLOW_TRACKING_TOKEN.name
    if code == 403:
        return (f"MLflow at {uri} refused access (HTTP 403): check {names} and the user's "
                "permissions")
    if not sent:
        return f"MLflow at {uri} needs a login (HTTP 401): set {names}"
    return f"MLflow at {uri} refused the credentials (HTTP 401): check {names}"


def _check_server(uri: str, own_login: bool) -> None:
    """The server answers, and takes the login MLflow's client would send (HTTP 401/403 are
    one line: ``/health`` needs no login on a basic-auth server, so a search tests it)."""
    base = uri.rstrip("/")
    try:
        try:
            with _urlopen(f"{base}/health", timeout=5):
                healthy = True
        except urllib.error.HTTPError:  # a proxy or an old server without /health
            healthy = False
        login = _login(uri)
        if login is None and healthy:
            return
        try:
            with _urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", 5,
                          login):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403) and (own_login or login):
                raise SlotsweepError(_refused(uri, exc.code, login or {})) from None
            if healthy:  # it answers; the API's own errors are the client's to report
                return
            raise
    except _HTTP_ERRORS as exc:
        reason = getattr(exc, "reason", None) or exc
        raise SlotsweepError(f"MLflow tracking server {uri} is unreachable ({reason}): start "
                             f"it or fix mlflow.tracking_uri / {TRACKING_URI_ENV}") from None


def check_tracking_uri(uri: str, own_login: bool = True) -> None:
    """Fail fast (one line) on a tracking URI a sweep would lose runs to or cannot reach.

    Servers (http/https) must answer and accept MLflow's login from this environment (with
    ``own_login=False``, for a Ray job whose nodes may bring their own, only a login given here
    is checked); absolute ``sqlite:////...`` and SQL databases pass (SQLite says "database is
    locked" with many parallel trials: prefer a server); relative paths, file stores and
    unknown schemes fail.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, own_login)
        return
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path.startswith("/"):
            raise SlotsweepError(f"tracking URI {uri} is a relative (or in-memory) SQLite store: "
                                 "Ray trials run in a temporary cwd and their runs would be "
                                 "lost; use sqlite:////absolute/path.db or an MLflow server")
        if not Path(path).parent.is_dir():
            raise SlotsweepError(f"tracking URI {uri}: directory {Path(path).parent} does not "
                                 "exist: create it or use an MLflow server")
        return
    if scheme.split("+")[0] in _DB_SCHEMES:
        return
    if scheme in ("", "file") or len(scheme) == 1:  # a path (or a Windows drive letter)
        path = parts.path if scheme == "file" else uri
        relative = "" if Path(path).is_absolute() else " and relative paths are lost in Ray trials"
        raise SlotsweepError(f"tracking URI {uri} is a file store: it needs "
                             f"MLFLOW_ALLOW_FILE_STORE=true, loses runs under concurrent "
                             f"trials{relative}; use an MLflow server (http://...)")
    raise SlotsweepError(f"tracking URI {uri} has an unsupported scheme {scheme!r}: use "
                         "http(s)://host:port, sqlite:////absolute/path.db or postgresql://...")


def resolve_tracking_uri(configured: str | None) -> str | None:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else None (start a LocalServer)."""
    for value in (configured, os.environ.get(TRACKING_URI_ENV)):
        if value and value.strip():
            return value.strip()
    return None
