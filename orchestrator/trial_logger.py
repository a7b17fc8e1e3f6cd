"""The Lightning callback that logs one trial to its MLflow run (:class:`TrialLogger`).

Tracking trouble never stops training: each MLflow call is tried at most ``1 + len(retry_delays)``
times, then skipped with one warning line. The retries are a short loop here, not a library's:
MLflow's own client already retries HTTP calls with urllib3's ``Retry`` (cut to one retry for a
trial, below), and what is left to retry is not HTTP alone: a whole call such as
:func:`~orchestrator.mlflow_runs.log_params` (read, then write), or a SQL store's "database is
locked" (``sqlite:////...`` and ``postgresql://...`` URIs are allowed).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from mlflow import MlflowClient
from mlflow.entities import Metric

from core.errors import one_line
from core.names import (
    BEST_CHECKPOINT_FILE,
    CHECKPOINTS_DIRNAME,
    RESOLVED_CONFIG_NAME,
    TAG_FEATURE_CACHE,
    VISUALS_DIRNAME,
)
from core.training.callbacks import METRICS_KEY
from orchestrator.mlflow_runs import (
    ARTIFACT_CHECKPOINT,
    ARTIFACT_CONFIG,
    ARTIFACT_VISUALS,
    log_params,
)

# A trial's own calls: MLflow's client alone retries a dead server ~4 min per call by default.
_TRIAL_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
_FAILED = object()  # what TrialLogger._safe returns for a call that kept failing


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
              f"({one_line(error or Exception())}); training continues", file=sys.stderr)
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
        self._safe("tags", self.client.set_tag, self.run_id, TAG_FEATURE_CACHE,
                   str(cache.root) if cache is not None else "none")
        if self._restored:  # the restore point's metrics: the process that logged them may
            # have died between writing the checkpoint and logging (driver killed)
            step = int(self._restored["step"])
            missing = {key: value for key, value in self._restored["metrics"].items()
                       if not self._logged_at(key, step)}
            self._log_metrics(trainer, ("train/", "val/"), missing, step)
            self._restored = None
        self.upload_artifacts(Path(trainer.default_root_dir), checkpoint=False)

    def _logged_at(self, key: str, step: int) -> bool:
        """Whether the run already holds ``key`` at ``step`` (then a resume must not log it
        again); unknown (the server is down) counts as no."""
        history = self._safe(f"history of {key}", self.client.get_metric_history, self.run_id, key)
        return history is not _FAILED and any(m.step == step for m in history)

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
