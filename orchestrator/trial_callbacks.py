"""The Lightning callbacks of a trial (loaded in the trial's process only): report to Tune after
every validation, and the faults tests inject."""

from __future__ import annotations

import errno
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytorch_lightning as pl
import torch

from core.names import BEST_JSON, LAST_CHECKPOINT
from orchestrator.trial import STATUS_KEY

HOLD_S = 300.0  # how long a "hold" fault parks its trial (a test kills it meanwhile)


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


class TuneReporter(pl.Callback):
    """After every validation: save ``last.ckpt`` and report metrics + that checkpoint.

    ``report(metrics, checkpoint_dir)`` is ``ray.tune.report`` for a plain trial and
    ``ray.train.report`` on the workers of a DDP trial.
    """

    def __init__(self, run_dir: Path, report: Any, checkpoint_cls: Any) -> None:
        self.run_dir, self.report, self.checkpoint_cls = run_dir, report, checkpoint_cls

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {**_metrics(trainer), "step": trainer.global_step, STATUS_KEY: "running"}
        with tempfile.TemporaryDirectory(prefix="slotsweep-ckpt-") as tmp:
            path = Path(tmp) / LAST_CHECKPOINT
            trainer.save_checkpoint(path)  # collective under DDP; rank 0 writes
            best = self.run_dir / BEST_JSON
            if best.is_file():
                shutil.copy(best, Path(tmp) / BEST_JSON)
            self.report(metrics, checkpoint=self.checkpoint_cls.from_directory(tmp))


class FaultInjector(pl.Callback):
    """Testing aid (``SLOTSWEEP_INJECT_FAULT``): make trial ``index`` raise once, turn its loss
    NaN, hold still once (so a test can kill it at a known step) at ``step``, or find the disk
    full (``enospc``) once when it writes the checkpoint of ``step``: the write call itself fails
    with ENOSPC, inside the trial's checkpoint writer. A marker file makes ``raise``, ``hold``
    and ``enospc`` happen only once per trial."""

    def __init__(self, spec: str, index: int, marker: Path) -> None:
        kind, which, step = spec.split(":")
        self.kind, self.step, self.marker = kind, int(step), marker
        self.active = int(which) == index

    def setup(self, trainer, pl_module, stage) -> None:
        if not self.active or self.kind != "enospc":
            return
        from pytorch_lightning.plugins import TorchCheckpointIO

        io = trainer.strategy.checkpoint_io
        write = io.save_checkpoint

        def save(checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            if checkpoint.get("global_step") == self.step and not self.marker.exists():
                self.marker.write_text("disk full")
                full = OSError(errno.ENOSPC, "No space left on device")
                with mock.patch.object(TorchCheckpointIO, "save_checkpoint", side_effect=full):
                    return write(checkpoint, path, storage_options)
            return write(checkpoint, path, storage_options)

        io.save_checkpoint = save

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.active or trainer.global_step != self.step:
            return
        if self.kind == "raise" and not self.marker.exists():
            self.marker.write_text("raised")
            raise RuntimeError(f"injected fault at step {self.step}")
        if self.kind == "hold" and not self.marker.exists():
            self.marker.write_text("held")
            time.sleep(HOLD_S)
        if self.kind == "nan":
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))
