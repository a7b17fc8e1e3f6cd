"""The Lightning ``Trainer`` of a run: process settings (precision, TF32, seeds, quiet logs),
the run folder, and the callbacks and logger every run has."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from core.config import Config
from core.config.load import PRECISIONS
from core.errors import ConfigError
from core.names import BEST_CHECKPOINT_FILE, CHECKPOINTS_DIRNAME, METRIC_ARI, METRIC_MBO

# The selection of best.ckpt unless a BestCheckpoint is among the callbacks: best val FG-ARI,
# ties broken by the higher val mBO.
DEFAULT_SELECT = (METRIC_ARI, "max", METRIC_MBO)


def is_rank_zero() -> bool:
    """True outside DDP and on the global rank 0 process (the one that prints and writes)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def quiet_lightning() -> None:
    """Lightning's INFO lines and the warnings that do not apply to these runs, silenced."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen ViT
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # val metrics are summed over ranks by hand (SlotModule._reduce): every rank logs the total
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")
    # Lightning logs every log_every_n_steps optimizer steps counted across epochs (training is
    # max_steps long, epochs are just passes over short datasets), so an epoch shorter than
    # the interval loses no train/ line: its "smaller than the logging interval" does not apply
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def lightning_precision(cfg: Config) -> str:
    """Lightning's precision for ``trainer.precision``: ``--use-optimizations`` turns 32 into
    ``bf16-mixed`` on a GPU; 16-bit on a CPU is a ``ConfigError``."""
    precision = PRECISIONS[str(cfg.trainer.precision)]
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if cfg.trainer.use_optimizations and cuda and precision == "32-true":
        precision = "bf16-mixed"
    if precision.startswith("16") and not cuda:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision} needs a GPU: "
                          "use trainer.precision=bf16 or 32 on a CPU")
    return precision


def prepare_process(cfg: Config) -> str:
    """Set what a run needs process-wide (quiet Lightning, TF32 under ``use_optimizations``,
    every seed from ``cfg.seed``); returns Lightning's precision, checked before any data is
    read."""
    import pytorch_lightning as pl

    quiet_lightning()
    precision = lightning_precision(cfg)
    if cfg.trainer.use_optimizations and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    return precision


def run_dir_for(log_dir: str | Path, experiment: str, resume_from: str | Path | None) -> Path:
    """Where a run writes: the folder of the checkpoint it resumes (``.../checkpoints/x.ckpt``),
    else ``<log_dir>/<experiment>``, or ``<experiment>-2``... if that one already holds a run."""
    if resume_from is not None:
        parent = Path(resume_from).resolve().parent
        if parent.name == CHECKPOINTS_DIRNAME:
            return parent.parent
    candidate, n = Path(log_dir) / experiment, 1
    while (candidate / CHECKPOINTS_DIRNAME).is_dir() and any(
        (candidate / CHECKPOINTS_DIRNAME).iterdir()
    ):
        n += 1
        candidate = Path(log_dir) / f"{experiment}-{n}"
    return candidate


def best_checkpoint(run_dir: str | Path, metric: str = DEFAULT_SELECT[0],
                    mode: str = DEFAULT_SELECT[1],
                    tie_break: str | None = DEFAULT_SELECT[2]) -> Any:
    """The ``BestCheckpoint`` callback keeping ``<run_dir>/checkpoints/best.ckpt`` by ``metric``
    (``mode`` max or min, ties broken by ``tie_break``) and ``<run_dir>/best.json``."""
    from core.training.callbacks import BestCheckpoint

    path = Path(run_dir) / CHECKPOINTS_DIRNAME / BEST_CHECKPOINT_FILE
    return BestCheckpoint(run_dir, path, metric, mode, tie_break)


def build_trainer(cfg: Config, run_dir: Path, datamodule: Any, callbacks: Sequence[Any] = (), *,
                  precision: str, progress_bar: bool | None = None,
                  trainer_kwargs: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """``(pl.Trainer, its BestCheckpoint)`` writing into ``run_dir``: step checkpoints, best.ckpt
    (the ``BestCheckpoint`` among ``callbacks``, else :func:`best_checkpoint`'s default), the
    config and RNG states in every checkpoint, slot pictures, TensorBoard, then ``callbacks``.
    ``trainer_kwargs`` replace Lightning Trainer arguments."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from core.training.callbacks import (
        BestCheckpoint,
        RunStateCallback,
        SlotVisualizer,
        StepCheckpoint,
    )
    from core.training.checkpoint import AtomicCheckpointIO
    from core.training.fast import FiniteGuard

    t = cfg.trainer
    val_every = min(t.val_check_interval, t.max_steps)
    best = next((c for c in callbacks if isinstance(c, BestCheckpoint)), None)
    if best is None:
        best = best_checkpoint(run_dir)
    others = [c for c in callbacks if c is not best]
    # a live bar on a terminal; elsewhere (a file, CI, a cluster's log) plain periodic lines,
    # unless the caller turned progress off (a sweep's trials: the sweep's table reports them)
    bar = sys.stderr.isatty() if progress_bar is None else progress_bar
    if progress_bar is None and not bar and is_rank_zero():
        from core.training.progress import ProgressLines

        others.append(ProgressLines(run_dir / CHECKPOINTS_DIRNAME))
    elif bar:
        from core.training.progress import StepBar

        others.append(StepBar(run_dir / CHECKPOINTS_DIRNAME))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices if t.accelerator != "cpu" or t.devices > 1 else 1,
        num_nodes=t.num_nodes,
        strategy="ddp" if t.strategy == "auto" and t.devices > 1 else t.strategy,
        precision=precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=int(limit) if (limit := t.limit_val_batches) > 1 else limit,
        num_sanity_val_steps=0,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        logger=logger,
        callbacks=[
            FiniteGuard(), StepCheckpoint(run_dir / CHECKPOINTS_DIRNAME, t.checkpoint_every,
                                          val_every),
            best, RunStateCallback(cfg),
            SlotVisualizer(run_dir, t.visualize_every, datamodule.mean, datamodule.std),
            *others,
        ],
        deterministic=t.deterministic,
        enable_progress_bar=bar,
        enable_model_summary=False,
        enable_checkpointing=False,  # StepCheckpoint / BestCheckpoint write them all, one naming
        default_root_dir=str(run_dir),
    )
    extra = dict(trainer_kwargs or {})
    kwargs["plugins"] = [AtomicCheckpointIO(), *extra.pop("plugins", [])]
    kwargs.update(extra)
    return pl.Trainer(**kwargs), best
