"""Everything MLflow for sweeps, on :class:`mlflow.MlflowClient` (no fluent state, no autolog).

One sweep is a parent run (``slotsweep.kind=sweep``, found again by ``slotsweep.sweep_key``);
each trial is a child run found again by ``(mlflow.parentRunId, trial_id)``, so a restored sweep
logs into the runs it started. :class:`TrialLogger` is the Lightning callback of a trial;
:class:`LocalServer` runs a private MLflow server when no tracking URI is configured.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag

from core.errors import SlotsweepError
from core.names import (
    BEST_CHECKPOINT_FILE,
    CHECKPOINTS_DIRNAME,
    MLFLOW_DIR_ENV,
    RESOLVED_CONFIG_NAME,
    TAG_FEATURE_CACHE,
    TAG_GIT,
    TAG_KIND,
    TAG_PARENT,
    TAG_SWEEP,
    TAG_SWEEP_KEY,
    TAG_TRIAL,
    VISUALS_DIRNAME,
)
from core.training.callbacks import METRICS_KEY

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
ARTIFACT_CONFIG = "config"
ARTIFACT_VISUALS = "visualizations"
ARTIFACT_CHECKPOINT = "checkpoints"
PARAM_CHANGED_PREFIX = "param_changed."
MAX_KEY, MAX_PARAM_VALUE, MAX_TAG_VALUE, BATCH = 250, 6000, 8000, 100  # MLflow's limits
PROJECT_DIR = Path(__file__).resolve().parents[1]
_DB_SCHEMES = ("postgresql", "mysql", "mssql")  # SQLAlchemy stores (optionally "+driver")
# A trial's own calls: MLflow's client alone retries a dead server ~4 min per call by default.
_TRIAL_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
_HTTP_ERRORS = (OSError, ValueError, http.client.HTTPException)  # urllib's, bad URLs too
_LOG_MARK = "--- slotsweep: starting mlflow server"
_ERROR_LINE = re.compile(r"^[\w.]+(Error|Exception)\b|\bERROR\b")
_FAILED = object()  # what TrialLogger._safe returns for a call that kept failing


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _urlopen(url: str, timeout: float):
    """GET without proxies for the loopback (a proxy cannot reach our 127.0.0.1)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        return opener.open(url, timeout=timeout)
    return urllib.request.urlopen(url, timeout=timeout)


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

    @classmethod
    def start(cls, root: Path, port: int | None = None, timeout: float = 90) -> LocalServer:
        """Start a server and wait until ``/health`` answers; SlotsweepError when it does not."""
        root = Path(root).expanduser().resolve()
        (root / "artifacts").mkdir(parents=True, exist_ok=True)
        if port is None:
            port = _free_port()
        else:  # else /health may answer from another server while ours fails to bind
            with socket.socket() as sock:
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                server.stop()
                raise SlotsweepError(f"MLflow server in {root} exited with code "
                                     f"{process.returncode}: {server.last_log_line()}")
            with contextlib.suppress(*_HTTP_ERRORS), _urlopen(f"{server.uri}/health", 2) as answer:
                if answer.status == 200:
                    return server
            time.sleep(0.25)
        server.stop()
        raise SlotsweepError(f"MLflow server in {root} did not answer on {server.uri} within "
                             f"{timeout:.0f} s: {server.last_log_line()}")

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

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
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


def quiet_mlflow() -> None:
    """No run links, progress bars or INFO lines from MLflow on our users' terminals."""
    import logging

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def check_tracking_uri(uri: str) -> None:
    """Fail fast (one line) on a tracking URI a sweep would lose runs to or cannot reach.

    Servers (http/https) must answer; absolute ``sqlite:////...`` and SQL databases pass (SQLite
    says "database is locked" with many parallel trials: prefer a server); relative paths, file
    stores and unknown schemes fail.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        base = uri.rstrip("/")
        try:
            try:
                with _urlopen(f"{base}/health", timeout=5):
                    return
            except urllib.error.HTTPError:  # a proxy or an old server without /health
                with _urlopen(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", 5):
                    return
        except _HTTP_ERRORS as exc:
            reason = getattr(exc, "reason", None) or exc
            raise SlotsweepError(f"MLflow tracking server {uri} is unreachable ({reason}): start "
                                 f"it or fix mlflow.tracking_uri / {TRACKING_URI_ENV}") from None
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


def _quote(value: str, what: str) -> str:
    if "'" in value or "\\" in value:
        raise SlotsweepError(f"{what} {value!r} must not contain quotes or backslashes")
    return f"'{value}'"


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created when missing; a deleted one is an error."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise SlotsweepError(f"MLflow experiment {name!r} is deleted: restore it (mlflow "
                             f"experiments restore --experiment-id {experiment.experiment_id}) or "
                             "pick another experiment name")
    return experiment.experiment_id


def git_commit(cwd: Path = PROJECT_DIR) -> str | None:
    """``git rev-parse HEAD`` of the project, or None (no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def client_for(tracking_uri: str) -> MlflowClient:
    """A client of ``tracking_uri`` (tracking and registry), no global MLflow state touched."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _find(client: MlflowClient, experiment_id: str, filters: dict[str, str]) -> Run | None:
    query = " AND ".join(f'tags."{k}" = {_quote(v, k)}' for k, v in filters.items())
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                               max_results=1)
    return found[0] if found else None


def _find_or_create(client: MlflowClient, experiment_id: str, filters: dict[str, str],
                    run_name: str, tags: dict[str, str]) -> str:
    run = _find(client, experiment_id, filters)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    return client.create_run(experiment_id, tags={**tags, **filters},
                             run_name=run_name).info.run_id


def get_or_create_sweep_run(client: MlflowClient, experiment_id: str, sweep_key: str,
                            sweep_name: str, tags: dict[str, str] | None = None) -> str:
    """The parent run of the sweep ``sweep_key`` (newest one, RUNNING again), or a new one."""
    extra = {TAG_SWEEP: sweep_name, **(tags or {})}
    if (sha := git_commit()) is not None:
        extra.setdefault(TAG_GIT, sha)
    filters = {TAG_SWEEP_KEY: sweep_key, TAG_KIND: "sweep"}
    return _find_or_create(client, experiment_id, filters, sweep_name, extra)


def get_or_create_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                            trial_id: str, run_name: str, tags: dict[str, str] | None = None
                            ) -> str:
    """The child run of ``trial_id`` under ``parent_run_id``, reused (RUNNING again) or new.

    The run's identity is ``(mlflow.parentRunId, trial_id)`` in MLflow itself, not a dict in
    memory: Ray's MLflowLoggerCallback keeps trial -> run only in memory, so after
    ``Tuner.restore`` it opens a second run per trial (the known "duplicate runs" bug). Here a
    restored or retried trial finds and continues its own run.
    """
    return _find_or_create(client, experiment_id, _trial_filters(parent_run_id, trial_id),
                           run_name, dict(tags or {}))


def _trial_filters(parent_run_id: str, trial_id: str) -> dict[str, str]:
    return {TAG_PARENT: parent_run_id, TAG_TRIAL: trial_id, TAG_KIND: "trial"}


def find_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str,
                   trial_id: str) -> str | None:
    """The run id of ``trial_id`` under ``parent_run_id``, or None; creates and changes nothing."""
    run = _find(client, experiment_id, _trial_filters(parent_run_id, trial_id))
    return run.info.run_id if run is not None else None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _param_text(value: Any) -> str:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> list[str]:
    """Log (nested dicts flattened with dots, lists as JSON, MLflow's length limits) params.

    Params the run already has with the same value are skipped, so a resumed trial logs again
    without MLflow's "Changing param values is not allowed". A different value (PBT mutations, a
    changed resume) is not an error: it is recorded as tag ``param_changed.<key>`` = new value,
    the param keeps its first value. Returns the changed keys.
    """
    existing = client.get_run(run_id).data.params
    new: dict[str, str] = {}
    changed: dict[str, str] = {}
    for raw_key, raw_value in _flat(params):
        key, value = _clip(str(raw_key), MAX_KEY), _clip(_param_text(raw_value), MAX_PARAM_VALUE)
        if key not in existing:
            new[key] = value
        elif existing[key] != value:
            changed[key] = value
    entities: list[Param | RunTag] = [Param(k, v) for k, v in new.items()]
    entities += [RunTag(_clip(PARAM_CHANGED_PREFIX + k, MAX_KEY), _clip(v, MAX_TAG_VALUE))
                 for k, v in changed.items()]
    for start in range(0, len(entities), BATCH):
        chunk = entities[start : start + BATCH]
        client.log_batch(run_id, params=[e for e in chunk if isinstance(e, Param)],
                         tags=[e for e in chunk if isinstance(e, RunTag)])
    return list(changed)


def finish_run(client: MlflowClient, run_id: str, status: str) -> None:
    """End a run as FINISHED, FAILED or KILLED."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise SlotsweepError(f"run status {status!r} is not FINISHED, FAILED or KILLED")
    client.set_terminated(run_id, status=status)


def runs_of_sweep(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Run]:
    """Every (not deleted) child run of a sweep run, oldest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], f'tags."{TAG_PARENT}" = '
                                  f"{_quote(parent_run_id, 'run id')}",
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


@contextlib.contextmanager
def _short_http_retries() -> Iterator[None]:
    """Fewer MLflow-internal retries for a trial's calls (a variable the user set wins)."""
    added = {k: v for k, v in _TRIAL_HTTP_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


FEATURE_CACHE_TAG = TAG_FEATURE_CACHE


class TrialLogger(pl.Callback):
    """Logs a trial's params, ``train/*`` and ``val/*`` metrics and artifacts to one MLflow run.

    Only the global rank 0 logs. An MLflow failure never reaches training: each call is retried
    ``len(retry_delays)`` times with backoff, then one warning line goes to stderr, and metric
    logging pauses ``pause_s`` seconds. Artifacts (``config/config.yaml``, new
    ``visualizations/*.png``, ``checkpoints/best.ckpt``) go up at the end of fit or on an
    exception; config and new visualizations also at the start and after each validation, so a
    trial stopped early by the scheduler still has them.
    """

    retry_delays: tuple[float, ...] = (1.0, 2.0, 4.0)
    pause_s: float = 60.0

    def __init__(self, tracking_uri: str, run_id: str, params: dict | None = None,
                 log_every_n_steps: int | None = None) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.params, self.log_every_n_steps = params, log_every_n_steps
        self._client: MlflowClient | None = None
        self._uploaded: dict[str, tuple[int, int]] = {}  # artifact -> (mtime_ns, size)
        self._listed = False
        self._last_step, self._paused_until = -1, 0.0
        self._restored: dict[str, Any] | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _safe(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with retries; ``_FAILED`` and a warning line when it keeps
        failing."""
        error: BaseException | None = None
        for delay in (0.0, *self.retry_delays):
            time.sleep(delay)
            try:
                with _short_http_retries():
                    return fn(*args, **kwargs)
            except Exception as exc:
                error = exc
        self._paused_until = time.monotonic() + self.pause_s
        print(f"slotsweep: warning: MLflow {what} failed for run {self.run_id} "
              f"({_one_line(error or Exception())}); training continues", file=sys.stderr)
        return _FAILED

    def _log_metrics(self, trainer: pl.Trainer, prefix: str | tuple[str, ...],
                     values: dict[str, float] | None = None, step: int | None = None) -> None:
        if time.monotonic() < self._paused_until:
            return
        stamp = int(time.time() * 1000)
        step = int(trainer.global_step if step is None else step)
        source = trainer.callback_metrics if values is None else values
        metrics = [Metric(key, float(value), stamp, step)
                   for key, value in source.items()
                   if key.startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1]
        for start in range(0, len(metrics), 1000):
            self._safe(f"{prefix}* metrics", self.client.log_batch, self.run_id,
                       metrics=metrics[start : start + 1000])

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        params = self.params
        if params is None and hasattr(pl_module, "cfg"):
            from core.config import flatten

            params = flatten(pl_module.cfg)
        if params:
            self._safe("params", log_params, self.client, self.run_id, params)
        cache = getattr(pl_module, "feature_cache", None)
        self._safe("tags", self.client.set_tag, self.run_id, FEATURE_CACHE_TAG,
                   str(cache.root) if cache is not None else "none")
        if self._restored:  # the restore point's metrics: the process that logged them may
            # have died between writing the checkpoint and logging (driver killed)
            self._log_metrics(trainer, ("train/", "val/"), self._restored["metrics"],
                              self._restored["step"])
            self._restored = None
        self.upload_artifacts(Path(trainer.default_root_dir), checkpoint=False)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._restored = checkpoint.get(METRICS_KEY)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        step = trainer.global_step
        due = step % every == 0 or step >= trainer.max_steps > 0  # the last step too
        if not trainer.is_global_zero or step == self._last_step or not due:
            return
        self._last_step = step
        self._log_metrics(trainer, "train/")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._log_metrics(trainer, "val/")
            if time.monotonic() >= self._paused_until:
                self.upload_artifacts(Path(trainer.default_root_dir), checkpoint=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.upload_artifacts(Path(trainer.default_root_dir))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.is_global_zero:
            self.upload_artifacts(Path(trainer.default_root_dir))

    def upload_artifacts(self, run_dir: Path, checkpoint: bool = True) -> None:
        """Upload ``config.yaml``, visualisations not uploaded yet and (``checkpoint``)
        ``checkpoints/best.ckpt`` of ``run_dir``; a file is sent again only when it changed.
        The first failed upload ends this round (the server is likely down)."""
        run_dir = Path(run_dir)
        if not self._listed:  # a resumed trial: what an earlier process uploaded is there
            listed = self._safe("artifact listing", self.client.list_artifacts, self.run_id,
                                ARTIFACT_VISUALS)
            if listed is _FAILED:
                return
            self._listed = True
            self._uploaded.update({info.path: (0, -1) for info in listed})
        files = [(run_dir / RESOLVED_CONFIG_NAME, ARTIFACT_CONFIG)]
        files += [(p, ARTIFACT_VISUALS) for p in sorted((run_dir / VISUALS_DIRNAME).glob("*.png"))]
        if checkpoint:
            best = run_dir / CHECKPOINTS_DIRNAME / BEST_CHECKPOINT_FILE
            files.append((best, ARTIFACT_CHECKPOINT))
        for path, folder in files:
            key = f"{folder}/{path.name}"
            if not path.is_file() or (folder == ARTIFACT_VISUALS and key in self._uploaded):
                continue
            stat = path.stat()
            if self._uploaded.get(key) == (stat.st_mtime_ns, stat.st_size):
                continue
            if self._safe(f"upload of {path.name}", self.client.log_artifact, self.run_id,
                          str(path), folder) is _FAILED:
                return
            self._uploaded[key] = (stat.st_mtime_ns, stat.st_size)
