"""``train(cfg, callbacks=()) -> dict``: one training run, and its command line.

    slotsweep train CONFIG [--data-dir D] [--log-dir L] [--continue CKPT] [--use-optimizations]
                    [key=value ...]

(``python -m core.train`` is the same command without the orchestrator.) A run writes
``<log_dir>/<experiment>/``: ``config.yaml`` (resolved), ``checkpoints/step=N.ckpt`` every
``trainer.checkpoint_every`` steps plus ``checkpoints/best.ckpt`` (best ``val/ari``),
TensorBoard events and ``visualizations/step=N.png``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from core.config import RESOLVED_CONFIG_NAME, Config, load_config, save_config
from core.config.load import PRECISIONS
from core.errors import ConfigError, SlotsweepError
from core.names import BEST_CHECKPOINT, CHECKPOINTS_DIRNAME, METRIC_ARI, METRIC_MBO

SELECT_METRIC = METRIC_ARI  # the default selection: best.ckpt is the best val FG-ARI
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
# Sections whose change means "a new stage" on --continue (fresh optimizer) rather than a resume.
_STAGE_SECTIONS = ("model", "optimizer", "globals")


def _quiet_lightning() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen ViT
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # val metrics are summed over ranks by hand (SlotModule._reduce): every rank logs the total
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by slotsweep, loaded safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: check the --continue path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ConfigError(f"checkpoint {path} is corrupt or not a slotsweep checkpoint "
                          f"({first}): use another checkpoint") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} has no state_dict: not a slotsweep checkpoint")
    return ckpt


def _load_weights(module: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    own = module.state_dict()
    wrong = [k for k, v in ckpt["state_dict"].items() if k in own and own[k].shape != v.shape]
    if result.missing_keys or result.unexpected_keys or wrong:
        parts = []
        if wrong:
            parts.append(f"shapes differ for {', '.join(wrong[:3])}")
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:3])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise ConfigError(f"checkpoint {path} does not fit this model ({'; '.join(parts)}): "
                          "was it trained with other NUM_SLOTS / SLOT_DIM / backbone?")


def _safe_load_weights(module, ckpt, path) -> None:
    module.on_load_checkpoint(ckpt)  # puts back a frozen backbone left out of the file
    try:
        _load_weights(module, ckpt, path)
    except RuntimeError as exc:  # size mismatch raised by load_state_dict itself
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ConfigError(f"checkpoint {path} does not fit this model ({first[:200]}): "
                          "was it trained with other NUM_SLOTS / SLOT_DIM / backbone?") from None


def load_into(module: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a slotsweep checkpoint's weights into a ``SlotModule`` (one-line errors); returns
    the checkpoint dict."""
    ckpt = read_checkpoint(path)
    _safe_load_weights(module, ckpt, path)
    return ckpt


def _stage_of(cfg: Config, ckpt: dict[str, Any]) -> str:
    """``resume`` when the checkpoint was trained with the same model and optimizer, else
    ``stage`` (weights only, fresh optimizer: the seed's two-stage training)."""
    from omegaconf import OmegaConf

    saved = ckpt.get("slotsweep_config")
    if saved is None:
        return "stage"
    before = OmegaConf.to_container(OmegaConf.create(saved))
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    same = all(before.get(k) == now.get(k) for k in _STAGE_SECTIONS)  # type: ignore[union-attr]
    return "resume" if same else "stage"


def _run_dir(log_dir: Path, experiment: str) -> Path:
    """``<log_dir>/<experiment>``, or ``<experiment>-2``... if that one already holds a run."""
    candidate, n = log_dir / experiment, 1
    while (candidate / CHECKPOINTS_DIRNAME).is_dir() and any(
        (candidate / CHECKPOINTS_DIRNAME).iterdir()
    ):
        n += 1
        candidate = log_dir / f"{experiment}-{n}"
    return candidate


def _precision(cfg: Config) -> str:
    precision = PRECISIONS[str(cfg.trainer.precision)]
    cuda = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    if cfg.trainer.use_optimizations and cuda and precision == "32-true":
        precision = "bf16-mixed"
    if precision.startswith("16") and not cuda:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision} needs a GPU: "
                          "use trainer.precision=bf16 or 32 on a CPU")
    return precision


def make_datamodule(cfg: Config, data_dir: str | Path | None) -> tuple[Config, Any]:
    """Generated data made if asked for, paths resolved, both splits read and checked.

    Returns the config with absolute dataset paths and its set-up ``VideoDataModule``.
    """
    from core.data.config import resolve_paths
    from core.data.datamodule import VideoDataModule, backbone_normalization
    from core.data.prepare import ensure_synthetic

    data_dir = ensure_synthetic(cfg.dataset, data_dir) or data_dir
    cfg = replace(cfg, dataset=resolve_paths(cfg.dataset, data_dir))
    backbone = cfg.model.encoder.backbone
    norm = backbone_normalization(backbone.model if backbone.weights == "pretrained" else None)
    datamodule = VideoDataModule(cfg.dataset, seed=cfg.seed, normalization=norm)
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


def train(
    cfg: Config,
    callbacks: Sequence[Any] = (),
    *,
    data_dir: str | Path | None = None,
    log_dir: str | Path = "logs",
    continue_from: str | Path | None = None,
    run_dir: str | Path | None = None,
    progress_bar: bool | None = None,
    select: tuple[str, str, str | None] = (SELECT_METRIC, "max", METRIC_MBO),
    trainer_kwargs: dict[str, Any] | None = None,
    trainer_hook: Any = None,
    extend_steps: bool = True,
) -> dict[str, Any]:
    """Train one model as ``cfg`` says; returns where everything went and the final metrics.

    ``callbacks`` are extra Lightning callbacks (the orchestrator's reporters). ``run_dir``
    overrides ``<log_dir>/<experiment>``. ``continue_from``: a checkpoint trained with the same
    model and optimizer settings is resumed exactly (step, optimizer, schedule, data position;
    ``trainer.max_steps`` at or below its step means "that many more steps"); otherwise its
    weights start a new stage with a fresh optimizer. ``select`` = (metric, mode, tie-break)
    chooses ``checkpoints/best.ckpt``. ``trainer_kwargs`` replace Lightning Trainer arguments and
    ``trainer_hook(trainer) -> trainer`` runs before fitting (the orchestrator's Ray DDP path).
    ``extend_steps=False`` keeps ``trainer.max_steps`` a total even on resume (a resumed sweep
    trial that had already finished trains no further).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    from core.training.callbacks import (
        BestCheckpoint,
        RunStateCallback,
        SlotVisualizer,
        StepCheckpoint,
        step_of,
    )
    from core.training.fast import FiniteGuard
    from core.training.module import SlotModule

    _quiet_lightning()
    t = cfg.trainer
    precision = _precision(cfg)
    if t.use_optimizations and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    cfg, datamodule = make_datamodule(cfg, data_dir)  # bad data fails here, before the model

    ckpt, ckpt_path, mode = None, None, "new"
    if continue_from is not None:
        ckpt = read_checkpoint(continue_from)
        mode = _stage_of(cfg, ckpt)
    module = SlotModule(cfg)
    features = feature_cache_for(cfg, module.model.encoder, datamodule)
    module.feature_cache = features  # the trial logger records which cache a run read
    if features is not None:
        datamodule.use_features(features, cfg.feature_cache.gpu)
        # the cache key has just hashed these very weights: no second pass over them
        module._weights_hash = features.manifest["key_inputs"]["weights_hash"]
    if ckpt is not None:
        _safe_load_weights(module, ckpt, continue_from)
        if mode == "resume":
            ckpt_path = str(continue_from)
            done = int(ckpt.get("global_step", 0))
            if t.max_steps <= done and extend_steps:
                cfg = replace(cfg, trainer=replace(t, max_steps=done + t.max_steps))
                t = cfg.trainer
                print(f"continuing from step {done} for {t.max_steps - done} more steps")
        else:
            print(f"starting a new stage from the weights of {continue_from} (fresh optimizer)")

    if run_dir is None:
        parent = Path(continue_from).resolve().parent if ckpt_path else None
        if parent is not None and parent.name == CHECKPOINTS_DIRNAME:
            run_dir = parent.parent  # a resume keeps writing where it started
        else:
            run_dir = _run_dir(Path(log_dir), cfg.experiment)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        save_config(cfg, run_dir / RESOLVED_CONFIG_NAME)
    ckpt_dir = run_dir / CHECKPOINTS_DIRNAME

    every = StepCheckpoint(ckpt_dir, t.checkpoint_every, min(t.val_check_interval, t.max_steps))
    best = BestCheckpoint(run_dir, ckpt_dir / f"{BEST_CHECKPOINT}.ckpt", *select)
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="", default_hp_metric=False)
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices if t.accelerator != "cpu" or t.devices > 1 else 1,
        num_nodes=t.num_nodes,
        strategy="ddp" if t.strategy == "auto" and t.devices > 1 else t.strategy,
        precision=precision,  # type: ignore[arg-type]
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=min(t.val_check_interval, t.max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=int(limit) if (limit := t.limit_val_batches) > 1 else limit,
        num_sanity_val_steps=0,
        gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps,
        logger=logger,
        callbacks=[
            FiniteGuard(), every, best, RunStateCallback(cfg),
            SlotVisualizer(run_dir, t.visualize_every, datamodule.mean, datamodule.std),
            *callbacks,
        ],
        deterministic=t.deterministic,
        enable_progress_bar=sys.stderr.isatty() if progress_bar is None else progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
    )
    kwargs.update(trainer_kwargs or {})
    trainer = pl.Trainer(**kwargs)
    if trainer_hook is not None:
        trainer = trainer_hook(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoints = sorted((str(p) for p in ckpt_dir.glob("step=*.ckpt")), key=step_of)
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


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="slotsweep train")
    parser.add_argument("config", help="YAML config (a path, or a shipped name: tiny, synthetic, "
                        "integrated_saycam)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. globals.NUM_SLOTS=10")
    parser.add_argument("--data-dir", default=None, help="dataset root; relative dataset paths "
                        "are taken from here")
    parser.add_argument("--log-dir", default="logs", help="runs go to LOG_DIR/<experiment>/")
    parser.add_argument("--continue", dest="continue_from", default=None, metavar="CKPT",
                        help="resume from (or start a new stage from) a checkpoint")
    parser.add_argument("--use-optimizations", action="store_true",
                        help="TF32, bf16 autocast and fused AdamW on a GPU")
    return parser


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, overrides_dest: str = "overrides"
) -> argparse.Namespace:
    """Parse, letting ``key=value`` overrides stand anywhere (also after the options)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        if not hasattr(args, overrides_dest):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        setattr(args, overrides_dest, [*getattr(args, overrides_dest), *extra])
    return args


def is_rank_zero() -> bool:
    """True outside DDP and on the global rank 0 process (the one that prints and writes)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``slotsweep train`` from parsed arguments; prints a summary, returns an exit code."""
    from core.errors import NonFiniteLossError

    overrides = list(args.overrides)
    if args.use_optimizations:
        overrides.append("trainer.use_optimizations=true")
    cfg = load_config(args.config, overrides)
    try:
        result = train(cfg, data_dir=args.data_dir, log_dir=args.log_dir,
                       continue_from=args.continue_from)
    except NonFiniteLossError as exc:
        print(f"slotsweep: training stopped: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if not is_rank_zero():
        return 0
    print(f"run: {result['run_dir']} ({result['global_step']} steps)")
    shown = {k: v for k, v in sorted(result["metrics"].items()) if "/" in k}
    print("  " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if result["best_checkpoint"]:
        print(f"best {SELECT_METRIC}={result['best_score']:.4f}: {result['best_checkpoint']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        return run_from_args(args)
    except SlotsweepError as exc:
        print(f"slotsweep: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
