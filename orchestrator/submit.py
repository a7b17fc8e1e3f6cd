"""``slotsweep submit SWEEP_FILE --address http://HEAD:8265``: a sweep as a Ray job on a cluster.

Order of events: the sweep file is validated here (a bad one is one line, nothing submitted) ->
the MLflow URI for the job is chosen (``--mlflow-uri``, else the file's ``mlflow.tracking_uri``,
else ``$MLFLOW_TRACKING_URI``; there is no embedded server on a cluster) and checked from here ->
the head's dashboard answers (and accepts the token) -> the project folder is uploaded as the
job's ``working_dir`` and the job runs ``python -m dashboards.cli sweep FILE key=value ...``
(``slotsweep sweep``: the sweep and its report, logged to the sweep's run) on the head, where
``RAY_ADDRESS`` points at the cluster, so the sweep's trials spread over it.

Token authentication (Ray 2.60): a head started by ``ray start --head`` checks a bearer token
when ``RAY_AUTH_MODE=token`` is set or a token exists where Ray looks for one
(``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``). Ray's
``JobSubmissionClient`` sends a token only when ``RAY_AUTH_MODE=token`` is set in the *client*'s
environment; here the token is always sent (``Authorization: Bearer``) when one is found: the
``token`` argument (``--token``), else the same three places Ray reads, so on the head node no
flag is needed. A head without token authentication ignores the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from core.errors import SlotsweepError, one_line
from core.names import TAG_SWEEP, TRACKING_URI_ENV
from orchestrator import PROJECT_DIR
from orchestrator import spec as specs
from orchestrator.mlflow_server import check_tracking_uri, resolve_tracking_uri

# Never uploaded: the venv, local results and caches (the working_dir limit is 100 MiB).
EXCLUDES = [".venv", "runs", "logs", ".git", "*.ckpt", "mlruns", "mlflow.db", "__pycache__"]
TOKEN_ENV, TOKEN_PATH_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
FORWARDED_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
NO_MLFLOW = ("a sweep on a cluster needs an MLflow server every node can reach: pass --mlflow-uri "
             "or set mlflow.tracking_uri / MLFLOW_TRACKING_URI (docker/compose.yaml runs one)")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")
_CONNECT_TIMEOUT_S = 10.0


def default_token_path() -> Path:
    """Where Ray keeps the cluster's token by default (``ray get-auth-token`` prints it)."""
    return Path.home() / ".ray" / "auth_token"


def resolve_token(token: str | None = None) -> tuple[str | None, str]:
    """The token to send and where it came from: ``token``, ``$RAY_AUTH_TOKEN``, the file
    ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token`` (Ray's own order after the argument)."""
    if token and token.strip():
        return token.strip(), "--token"
    if os.environ.get(TOKEN_ENV, "").strip():
        return os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    path_env = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if path_env:
        try:
            text = Path(path_env).expanduser().read_text().strip()
        except OSError as exc:
            raise SlotsweepError(f"{TOKEN_PATH_ENV}={path_env} cannot be read "
                                 f"({exc.strerror or exc}): fix or unset it") from None
        if not text:
            raise SlotsweepError(f"{TOKEN_PATH_ENV}={path_env} is empty: put the token from "
                                 "`ray get-auth-token` in it, or unset it")
        return text, TOKEN_PATH_ENV
    default = default_token_path()
    with contextlib.suppress(OSError):
        text = default.read_text().strip()
        if text:
            return text, str(default)
    return None, "none"


def normalize_address(address: str | None) -> str:
    """``http(s)://HOST[:PORT][/path]`` of the head's dashboard (``HOST:PORT`` gets http://);
    ``$RAY_ADDRESS`` when ``address`` is None and it is such a URL."""
    if address is None:
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if not env.startswith(("http://", "https://")):
            raise SlotsweepError("no cluster given: pass --address http://HEAD:8265 (the head's "
                                 "dashboard) or set RAY_ADDRESS to it")
        address = env
    text = address.strip()
    if not text:
        raise SlotsweepError("--address is empty: pass the head's dashboard, http://HEAD:8265")
    if "://" not in text:
        text = f"http://{text}"
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        hint = " (ray:// is Ray Client, not the Jobs API)" if scheme == "ray" else ""
        raise SlotsweepError(f"--address {address} has scheme {scheme!r}{hint}: pass the head's "
                             "dashboard, http://HEAD:8265")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if not parts.hostname or port == -1 or parts.query or parts.fragment:
        raise SlotsweepError(f"--address {address} is not a URL like http://HEAD:8265: pass the "
                             "head's dashboard address")
    return text.rstrip("/")


def _reason(exc: BaseException) -> str:
    """A short cause of a connection error ('Connection refused', 'timed out', ...)."""
    text = str(exc)
    found = _ERRNO.findall(text)
    if found:
        return found[-1].strip()
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timed out"
    return one_line(exc, 200)


def _rejected(address: str) -> SlotsweepError:
    return SlotsweepError(f"Ray at {address} rejected the request (token authentication): run "
                          "`ray get-auth-token` on the head node and pass --token or set "
                          f"{TOKEN_ENV}")


def _unreachable(address: str, reason: str) -> SlotsweepError:
    return SlotsweepError(f"Ray at {address} is unreachable ({reason}): check --address "
                          "(http://HEAD:8265) and that the dashboard is up")


def _preflight(address: str, headers: dict[str, str]) -> None:
    """One GET of ``/api/version`` with a timeout (Ray's client has none): unreachable,
    token rejected, or not a Ray dashboard, each as one line."""
    import requests

    try:
        answer = requests.get(f"{address}/api/version", headers=headers,
                              timeout=_CONNECT_TIMEOUT_S)
    except requests.exceptions.RequestException as exc:
        raise _unreachable(address, _reason(exc)) from None
    if answer.status_code in (401, 403):
        raise _rejected(address)
    try:
        version = answer.json().get("ray_version") if answer.status_code == 200 else None
    except ValueError:
        version = None
    if not version:
        raise SlotsweepError(f"{address} answered HTTP {answer.status_code} but is not a Ray "
                             "dashboard: check --address (http://HEAD:8265, the dashboard port)")


_RAY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                "ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir")


@contextlib.contextmanager
def _quiet_ray() -> Iterator[None]:
    """No packaging chatter ("Ignoring upload ...", "Uploading package ...") around our lines."""
    loggers = [logging.getLogger(name) for name in _RAY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _without_ray_address() -> Iterator[None]:
    """Ray's client replaces the address it is given by ``$RAY_ADDRESS`` /
    ``$RAY_API_SERVER_ADDRESS``: the explicit one must win."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
             if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, token: str | None) -> Any:
    """A ``JobSubmissionClient`` of the head at ``address`` (already normalized), checked."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    _preflight(address, headers)
    try:
        with _without_ray_address():
            return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise _rejected(address) from None
    except ConnectionError as exc:
        raise _unreachable(address, _reason(exc)) from None
    except (RuntimeError, ValueError) as exc:
        raise SlotsweepError(f"Ray at {address}: {one_line(exc)}") from None


def job_uri(spec: specs.SweepSpec, mlflow_uri: str | None) -> str:
    """The MLflow URI the job logs to: the argument, the file's, ``$MLFLOW_TRACKING_URI``."""
    uri = (mlflow_uri or "").strip() or resolve_tracking_uri(spec.mlflow.tracking_uri)
    if not uri:
        raise SlotsweepError(NO_MLFLOW)
    check_tracking_uri(uri, own_login=False)  # the nodes may log in with their own
    return uri


def sweep_path_in(sweep_file: str | Path, working_dir: Path) -> str:
    """The sweep file's path inside the uploaded ``working_dir`` (POSIX, relative)."""
    file = specs.find_sweep(sweep_file).resolve()
    try:
        return file.relative_to(working_dir).as_posix()
    except ValueError:
        raise SlotsweepError(f"sweep file {file} is outside the project {working_dir}, which is "
                             "all the cluster gets: move it into sweeps/") from None


def entrypoint(sweep_path: str, overrides: Sequence[str]) -> str:
    return shlex.join(["python", "-m", "dashboards.cli", "sweep", sweep_path, *overrides])


def _host(url: str) -> str:
    return (urllib.parse.urlsplit(url).hostname or "").lower()


def follow_job(client: Any, job_id: str, stream: TextIO) -> int:
    """Stream the job's logs to ``stream`` until it ends; 0 if it SUCCEEDED, else 1."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            stream.write(chunk)
            stream.flush()

    try:
        with warnings.catch_warnings():  # Ray's own websocket call, nothing a user can act on
            warnings.filterwarnings("ignore", "ssl=None is deprecated", DeprecationWarning)
            asyncio.run(tail())
    except Exception as exc:  # the log stream broke: the job may go on, wait for its status
        print(f"slotsweep: warning: log stream of job {job_id} ended "
              f"({one_line(exc)}); waiting for the job", file=sys.stderr)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1.0)
    if status == JobStatus.SUCCEEDED:
        return 0
    message = one_line(Exception(client.get_job_info(job_id).message or ""))
    message = re.sub(r",? *last available logs.*$", "", message).rstrip(": ")
    print(f"slotsweep: job {job_id} {status.value}" + (f": {message}" if message else ""),
          file=sys.stderr)
    return 1


def submit(sweep_file: str | Path, address: str | None, overrides: Sequence[str] = (),
           follow: bool = False, token: str | None = None, mlflow_uri: str | None = None,
           working_dir: str | Path = PROJECT_DIR, stream: TextIO | None = None) -> int:
    """Submit the sweep ``sweep_file`` (+ ``overrides``) as a Ray job to the head at ``address``;
    with ``follow`` stream its logs and return 0 if it SUCCEEDED, else 1. Bad input:
    :class:`SlotsweepError` (one line), and nothing is submitted."""
    stream = stream or sys.stdout
    overrides = list(overrides)
    spec = specs.load_sweep(sweep_file, overrides)
    working_dir = Path(working_dir).resolve()
    sweep_path = sweep_path_in(sweep_file, working_dir)
    uri = job_uri(spec, mlflow_uri)
    address = normalize_address(address)
    if mlflow_uri and mlflow_uri.strip():  # else the file's mlflow.tracking_uri wins over env
        overrides.append(f"mlflow.tracking_uri={uri}")
    if _host(uri) in _LOOPBACK and _host(address) not in _LOOPBACK:
        print(f"slotsweep: warning: MLflow {uri} is a loopback address: the cluster's nodes "
              "reach their own, not yours; use an address every node can reach", file=sys.stderr)
    secret, source = resolve_token(token)
    client = connect(address, secret)
    env = {TRACKING_URI_ENV: uri}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    runtime_env = {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env}
    try:
        with _quiet_ray():
            job_id = client.submit_job(entrypoint=entrypoint(sweep_path, overrides),
                                       runtime_env=runtime_env,
                                       metadata={TAG_SWEEP: spec.name})
    except Exception as exc:
        from ray.exceptions import AuthenticationError

        if isinstance(exc, AuthenticationError):
            raise _rejected(address) from None
        raise SlotsweepError(f"Ray at {address} did not take the job: "
                             f"{one_line(exc)}") from None
    auth = "RAY_AUTH_MODE=token " if secret else ""
    if source == "--token":
        auth += f"{TOKEN_ENV}=<token> "
    print(f"submitted sweep {spec.name} as Ray job {job_id} to {address}", file=stream)
    print(f"  MLflow: {uri} (experiment {spec.mlflow.experiment})", file=stream)
    print(f"  follow: {auth}ray job logs --follow {job_id} --address {address}"
          f"   (or slotsweep submit ... --follow)", file=stream)
    print(f"  stop:   {auth}ray job stop {job_id} --address {address}", file=stream, flush=True)
    if not follow:
        return 0
    try:
        with _quiet_ray():
            return follow_job(client, job_id, stream)
    except KeyboardInterrupt:
        print(f"slotsweep: stopped following; job {job_id} goes on (ray job stop {job_id} "
              f"--address {address} ends it)", file=sys.stderr)
        raise
