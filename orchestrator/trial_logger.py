"""The Lightning callback that logs one trial to its MLflow run (:class:`TrialLogger`).

Tracking trouble never stops training: every MLflow call goes through a
:class:`~orchestrator.mlflow_sender.MlflowSender`, a background line that keeps calls while the
server is away and sends them, in order, when it answers. At the end of fitting the line is given
``flush_s`` seconds; metric values still unsent are kept in the run folder
(``mlflow_unsent.json``) with one warning line, and sent by the run's next process or by the
sweep when the server is back.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from mlflow import MlflowClient
from mlflow.entities import Metric

from core.names import (
    METRICS_KEY,
    MLFLOW_JOURNAL,
    TAG_FEATURE_CACHE,
)
from orchestrator.mlflow_runs import (
    log_params,
)
from orchestrator.mlflow_sender import (
    ARTIFACT_UPLOAD,
    ArtifactUploader,
    MlflowSender,
    journal_pending,
    save_unsent,
    send_saved,
)


class TrialLogger(pl.Callback):
    """Logs a trial's params, ``train/*`` and ``val/*`` metrics and artifacts to one MLflow run.

    Only the global rank 0 logs, and only by queueing calls (see the module docstring).
    Artifacts (``config/config.yaml``, new ``visualizations/*.png``, ``checkpoints/best.ckpt``)
    go up at the end of fit or on an exception; config and new visualizations also at the start
    and after each validation, so a trial stopped early by the scheduler still has them.
    """

    flush_s = 30.0  # how long the end of fitting waits for a server that does not answer

    def __init__(self, tracking_uri: str, run_id: str, params: dict | None = None,
                 log_every_n_steps: int | None = None) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.params, self.log_every_n_steps = params, log_every_n_steps
        self.sender = MlflowSender(tracking_uri, run_id)
        self.uploader = ArtifactUploader(run_id)
        self._last_step = -1
        self._restored: dict[str, Any] | None = None
        # resumed: steps the run already holds, per key (read once, by the line's thread), so a
        # step trained again after a crash is not logged twice
        self._held: dict[str, set[int]] | None = None

    @property
    def client(self) -> MlflowClient:
        return self.sender.client

    def _log_metrics(self, trainer: pl.Trainer, prefix: str | tuple[str, ...],
                     values: dict[str, float] | None = None, step: int | None = None) -> None:
        stamp = int(time.time() * 1000)
        step = int(trainer.global_step if step is None else step)
        source = trainer.callback_metrics if values is None else values
        metrics = [Metric(key, float(value), stamp, step)
                   for key, value in source.items()
                   if key.startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1]
        for start in range(0, len(metrics), 1000):
            chunk = metrics[start : start + 1000]
            self.sender.submit(f"{prefix}* metrics at step {step}",
                               lambda c, chunk=chunk: self._send_new(c, chunk), metrics=chunk)

    def _send_new(self, client: MlflowClient, metrics: list[Metric]) -> None:
        """``log_batch`` of the values whose (key, step) the run does not hold yet."""
        if self._held is not None:
            for key in {m.key for m in metrics} - set(self._held):
                self._held[key] = {m.step for m in client.get_metric_history(self.run_id, key)}
            metrics = [m for m in metrics if m.step not in self._held[m.key]]
        if metrics:
            client.log_batch(self.run_id, metrics=metrics)
        if self._held is not None:  # what was just sent is held too
            for m in metrics:
                self._held[m.key].add(m.step)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        run_dir = Path(trainer.default_root_dir)
        self.sender.submit("values kept from an earlier process", lambda c: _raise_if(
            send_saved(c, run_dir, lambda: self.uploader.upload(c, run_dir))))
        journal = run_dir / MLFLOW_JOURNAL
        lost = journal_pending(journal)  # queued by a process killed before it sent them
        journal.unlink(missing_ok=True)
        self.sender.journal = journal
        if lost:
            self._held = self._held if self._held is not None else {}
            self.sender.submit("values queued by a killed process",
                               lambda c: self._send_new(c, lost), metrics=lost)
        params = self.params
        if params is None and hasattr(pl_module, "cfg"):
            from core.config import flatten

            params = flatten(pl_module.cfg)
        if params:
            self.sender.submit("params", lambda c: log_params(c, self.run_id, params),
                               params=params)
        cache = getattr(pl_module, "feature_cache", None)
        tags = {TAG_FEATURE_CACHE: str(cache.root) if cache is not None else "none"}
        self.sender.submit("tags", lambda c: [c.set_tag(self.run_id, k, v)
                                              for k, v in tags.items()], tags=tags)
        if self._restored:  # the restore point's metrics: the process that logged them may
            # have died between writing the checkpoint and logging (driver killed)
            restored, self._restored = self._restored, None
            self.sender.submit("metrics of the restore point",
                               lambda c: self._log_missing(c, restored))
        self._queue_uploads(run_dir, checkpoint=False)

    def _log_missing(self, client: MlflowClient, restored: dict[str, Any]) -> None:
        """Log the restore point's values the run does not hold yet (never twice)."""
        stamp, step = int(time.time() * 1000), int(restored["step"])
        self._held = self._held if self._held is not None else {}
        self._send_new(client, [Metric(key, float(value), stamp, step)
                                for key, value in restored["metrics"].items()
                                if key.startswith(("train/", "val/"))])

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._restored = checkpoint.get(METRICS_KEY)
        self._held = {}

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
            self._queue_uploads(Path(trainer.default_root_dir), checkpoint=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._queue_uploads(Path(trainer.default_root_dir))
            self.finish(Path(trainer.default_root_dir))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if trainer.is_global_zero:
            self._queue_uploads(Path(trainer.default_root_dir))
            self.finish(Path(trainer.default_root_dir))

    def finish(self, run_dir: Path) -> None:
        """Give the line ``flush_s`` seconds; keep what is left in ``run_dir`` with one line."""
        unsent = self.sender.close(self.flush_s)
        (run_dir / MLFLOW_JOURNAL).unlink(missing_ok=True)  # sent, or kept below
        if unsent or self.sender.dropped:
            what = save_unsent(run_dir, self.run_id, unsent, self.sender.dropped)
            print(f"slotsweep: warning: MLflow run {self.run_id} misses {what}: kept in "
                  f"{run_dir}, sent when the server answers again", file=sys.stderr, flush=True)
        self.sender = MlflowSender(self.tracking_uri, self.run_id, self.sender.client)

    def _queue_uploads(self, run_dir: Path, checkpoint: bool = True) -> None:
        self.sender.submit(ARTIFACT_UPLOAD, lambda c: self.uploader.upload(c, run_dir, checkpoint))


def _raise_if(missing: str | None) -> None:
    """A kept-values job fails (and is retried) while some are still unsent."""
    if missing is not None and "metric values (steps" in missing:
        raise ConnectionError(f"kept values not sent yet: {missing}")
