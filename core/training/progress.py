"""Training progress when no live bar can be drawn (output to a file, CI, a cluster's log): a
plain line every ``every_s`` seconds and after a validation (at most one per 5 s), telling what
a researcher checks on a long run: where it is, how fast it goes, when it ends, the loss, the
last validation, and where its checkpoints go; on a terminal, a live bar over the whole run
(StepBar) tells the same."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

from core.names import METRIC_ARI, METRIC_MBO, TRAIN_LOSS
from core.text import pace

EVERY_S = 30.0
VAL_GAP_S = 5.0  # a validation's line waits this long after the last line (tiny runs validate
# every few steps)


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


class ProgressLines(pl.Callback):
    """``step 120/600 (20%) · 3.1 steps/s · ETA 2m35s · train/loss 0.8312 · val/ari 0.21
    val/mbo 0.18 (step 100)``, after a first line saying where the checkpoints go."""

    def __init__(self, checkpoints: Path, every_s: float = EVERY_S,
                 stream: TextIO | None = None) -> None:
        self.checkpoints, self.every_s, self.stream = checkpoints, every_s, stream
        self._t0 = self._last = 0.0
        self._s0 = 0
        self._val: tuple[int, float | None, float | None] | None = None

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._s0 = trainer.global_step
        self._print(f"training to step {trainer.max_steps} (from {self._s0}); checkpoints in "
                    f"{self.checkpoints}; a line every {self.every_s:.0f} s and after "
                    f"validations")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self._print(self.line(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self._val = (trainer.global_step, _value(metrics, METRIC_ARI), _value(metrics, METRIC_MBO))
        if time.monotonic() - self._last >= min(self.every_s, VAL_GAP_S):  # news, not a flood
            self._print(self.line(trainer))

    def line(self, trainer: pl.Trainer, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        self._last = now
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
        parts += pace(step - self._s0, total - step, now - self._t0, "steps")
        loss = _value(trainer.callback_metrics, TRAIN_LOSS)
        if loss is not None:
            parts.append(f"{TRAIN_LOSS} {loss:.4g}")
        if self._val is not None:
            at, ari, mbo = self._val
            shown = "  ".join(f"{k} {v:.4g}" for k, v in ((METRIC_ARI, ari), (METRIC_MBO, mbo))
                              if v is not None)
            if shown:
                parts.append(f"{shown} (step {at})")
        return " · ".join(parts)


class StepBar(TQDMProgressBar):
    """Lightning's live bar on a terminal, counting the whole run (``step N/max_steps``, steps/s,
    ETA to the end) instead of one epoch (short epochs restart it every few seconds), with
    train/loss and the last val/ari and val/mbo beside it and the checkpoints' folder printed
    above it once."""

    def __init__(self, checkpoints: Path) -> None:
        super().__init__()
        self.checkpoints = checkpoints

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.train_progress_bar.write(f"training to step {trainer.max_steps} (from "
                                      f"{trainer.global_step}); checkpoints in {self.checkpoints}")
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.initial = trainer.global_step
        self.train_progress_bar.unit = " steps"
        self.train_progress_bar.set_description("step")

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """Kept across epochs (Lightning's own resets the bar to the epoch's batches)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
