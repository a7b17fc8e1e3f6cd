"""``train(cfg, callbacks=()) -> dict``: one training run.

A run writes ``<log_dir>/<experiment>/``: ``config.yaml`` (resolved), ``checkpoints/step=N.ckpt``
every ``trainer.checkpoint_every`` steps plus ``checkpoints/best.ckpt`` (best ``val/ari``),
TensorBoard events and ``visualizations/step=N.png``. Checkpoints are read by
``core.training.checkpoint``, the Trainer is built by ``core.training.trainer`` and the
``slotsweep train`` command is ``core.cli`` (``python -m core.train`` runs it alone).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.config import Config, save_config
from core.errors import ConfigError, SlotsweepError
from core.names import CHECKPOINTS_DIRNAME, RESOLVED_CONFIG_NAME
from core.training.checkpoint import load_weights, read_checkpoint, stage_of
from core.training.trainer import build_trainer, is_rank_zero, prepare_process, run_dir_for


def make_datamodule(cfg: Config, data_dir: str | Path | None) -> tuple[Config, Any]:
    """Generated data made if asked for, paths resolved, both splits read and checked.

    Returns the config with absolute dataset paths and its set-up ``VideoDataModule``.
    """
    from core.data.config import resolve_paths
    from core.data.datamodule import VideoDataModule
    from core.data.prepare import ensure_synthetic
    from core.models.encoder import normalization_of

    data_dir = ensure_synthetic(cfg.dataset, data_dir) or data_dir
    cfg = replace(cfg, dataset=resolve_paths(cfg.dataset, data_dir))
    datamodule = VideoDataModule(cfg.dataset, seed=cfg.seed,
                                 normalization=normalization_of(cfg.model.encoder.backbone))
    datamodule.setup("fit")
    return cfg, datamodule


def feature_cache_for(cfg: Config, encoder: Any, datamodule: Any, say: bool = True,
                      log: Any = None) -> Any:
    """The run's feature cache (``feature_cache.mode``: ``build`` builds a missing one), or
    ``None``: the backbone runs on frames. Says what it decided."""
    from core.data.feature_cache.build import ensure_cache
    from core.data.feature_cache.key import refusal

    fc = cfg.feature_cache
    if fc.mode == "off" or encoder is None:
        return None
    say = say and is_rank_zero()
    if fc.gpu == "on" and not (torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"):
        raise ConfigError("feature_cache.gpu=on but this run has no GPU: "
                          "use feature_cache.gpu=auto")
    why = refusal(cfg)
    if why is not None:
        if say:
            print(f"feature cache: not used: {why}")
        return None
    splits = {cfg.dataset.train_split: datamodule.train_set.records}
    if datamodule.val_set is not None:
        splits[cfg.dataset.val_split] = datamodule.val_set.records
    cache = ensure_cache(encoder, cfg.dataset, splits, fc, cfg.model.encoder.backbone.model,
                         build=fc.mode == "build", normalization=(datamodule.mean, datamodule.std),
                         log=log)
    if say:
        if cache is None:
            print("feature cache: none for this backbone and data (`slotsweep cache-features "
                  "CONFIG` builds one): the backbone runs on every frame")
        else:
            print(f"feature cache: using {cache.describe()}")
    return cache


# PyTorch's message when a DataLoader worker process dies of a signal (torch/utils/data/_utils/
# signal_handling.py and dataloader.py): "DataLoader worker (pid 123) is killed by signal: ...".
_LOADER_KILLED = re.compile(r"DataLoader worker \(pid(?:\(s\))? [^)]*\) (is killed by signal: "
                            r"[^.\n]*|exited unexpectedly)")


class LoaderKilledError(SlotsweepError):
    """A data-loading worker died (out of memory, a cluster's kill): training stopped, the last
    checkpoint is on disk."""

    def __init__(self, what: str, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        where = (f"the last checkpoint is {checkpoint}" if checkpoint is not None
                 else "no checkpoint was written yet")
        super().__init__(f"a data-loading worker died ({what}; out of memory? lower "
                         f"dataset.num_workers or dataset.batch_size); {where}")


class TrainingInterruptedError(SlotsweepError):
    """Training stopped by Ctrl-C or SIGTERM; the last checkpoint is on disk."""

    def __init__(self, how: str, step: int, checkpoint: Path | None) -> None:
        self.checkpoint = checkpoint
        where = (f"the last checkpoint is {checkpoint}" if checkpoint is not None
                 else "no checkpoint was written yet")
        super().__init__(f"training interrupted by {how} at step {step}; {where}")


def _newest(folder: Path) -> Path | None:
    from core.names import step_of

    steps = sorted(folder.glob("step=*.ckpt"), key=step_of)
    return steps[-1] if steps else None


def train(
    cfg: Config,
    callbacks: Sequence[Any] = (),
    *,
    data_dir: str | Path | None = None,
    log_dir: str | Path = "logs",
    continue_from: str | Path | None = None,
    run_dir: str | Path | None = None,
    progress_bar: bool | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model as ``cfg`` says, to ``trainer.max_steps`` in all; returns where
    everything went and the final metrics.

    ``callbacks`` are extra Lightning callbacks; a ``BestCheckpoint`` among them chooses
    ``checkpoints/best.ckpt`` instead of the default selection (best ``val/ari``, ties by
    ``val/mbo``), as a ``ModelCheckpoint`` replaces Lightning's default one. ``run_dir``
    overrides ``<log_dir>/<experiment>``. ``continue_from``: a checkpoint trained with the same
    model and optimizer settings is resumed exactly (step, optimizer, schedule, data position)
    in its own run folder; otherwise its weights start a new stage with a fresh optimizer.
    ``trainer_kwargs`` replace Lightning Trainer arguments.
    """
    from core.names import METRICS_KEY, step_of
    from core.training.module import SlotModule

    precision = prepare_process(cfg)
    if cfg.feature_cache.mode == "build":
        from core.data.feature_cache.key import writable_cache_dir

        writable_cache_dir(cfg.feature_cache)  # before generating any data
    cfg, datamodule = make_datamodule(cfg, data_dir)  # bad data fails here, before the model

    ckpt, mode = None, "new"
    if continue_from is not None:
        ckpt = read_checkpoint(continue_from)
        mode = stage_of(cfg, ckpt)
    module = SlotModule(cfg)
    features = feature_cache_for(cfg, module.model.encoder, datamodule)
    module.feature_cache = features  # the trial logger records which cache a run read
    if features is not None:
        datamodule.use_features(features, cfg.feature_cache.gpu)
        # the cache key has just hashed these very weights: no second pass over them
        module._weights_hash = features.manifest["key_inputs"]["weights_hash"]
    if ckpt is not None:
        load_weights(module, ckpt, continue_from)
        if mode == "stage":
            print(f"starting a new stage from the weights of {continue_from} (fresh optimizer)")
    resume = str(continue_from) if mode == "resume" else None

    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(log_dir, cfg.experiment, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        save_config(cfg, run_dir / RESOLVED_CONFIG_NAME)
    trainer, best = build_trainer(cfg, run_dir, datamodule, callbacks, precision=precision,
                                  progress_bar=progress_bar, trainer_kwargs=trainer_kwargs)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    except RuntimeError as exc:
        killed = _LOADER_KILLED.search(str(exc))
        if killed is None:
            raise
        raise LoaderKilledError(killed.group(0), _newest(run_dir / CHECKPOINTS_DIRNAME)) from None
    except (KeyboardInterrupt, SystemExit) as exc:
        # Lightning ends a fit on Ctrl-C with sys.exit(1) and on SIGTERM with SIGTERMException
        # (a SystemExit), after its graceful shutdown; both leave the trainer INTERRUPTED
        if trainer.state.status != "interrupted":
            raise
        how = "SIGTERM" if type(exc).__name__ == "SIGTERMException" else "Ctrl-C"
        raise TrainingInterruptedError(how, int(trainer.global_step),
                                       _newest(run_dir / CHECKPOINTS_DIRNAME)) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    restored = (ckpt or {}).get(METRICS_KEY) or {}
    if mode == "resume" and restored.get("step") == trainer.global_step:
        # resumed at its last step (an interrupted sweep's trial that had finished training):
        # nothing ran, so the checkpoint's own record is the run's final metrics
        metrics = {**restored.get("metrics", {}), **metrics}
    checkpoints = sorted(
        (str(p) for p in (run_dir / CHECKPOINTS_DIRNAME).glob("step=*.ckpt")), key=step_of)
    return {
        "run_dir": str(run_dir),
        "config": str(run_dir / RESOLVED_CONFIG_NAME),
        "checkpoints": checkpoints,
        "best_checkpoint": best.best["checkpoint"] if best.best else None,
        "best_score": best.best["score"] if best.best else None,
        "best_step": best.best["step"] if best.best else None,
        "best_metrics": best.best["metrics"] if best.best else {},
        "global_step": int(trainer.global_step),
        "metrics": metrics,
        "mode": mode,
        "feature_cache": str(features.root) if features is not None else None,
    }


if __name__ == "__main__":  # ``python -m core.train CONFIG ...``: the train command alone
    from core.cli import train_main

    sys.exit(train_main())
