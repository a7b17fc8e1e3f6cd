"""Slotsweep checkpoints: written atomically, loaded safely, weights into a model, resume or
new stage.

Every failure is one line that says what to do (a wrong ``--continue`` path, a file that is not
a slotsweep checkpoint, weights of another model size, a full disk).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from core.config import Config
from core.errors import ConfigError, SlotsweepError, one_line

# Sections whose change means "a new stage" on --continue (fresh optimizer) rather than a resume.
STAGE_SECTIONS = ("model", "optimizer", "globals")
_MISFIT_HINT = "was it trained with other NUM_SLOTS / SLOT_DIM / backbone?"


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint written by slotsweep, loaded safely (``weights_only=True``). ``mmap``: map
    the tensors instead of reading them (a cheap look at its step and whether it opens: a file
    cut short has no zip directory at its end)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: check the --continue path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise ConfigError(f"checkpoint {path} is corrupt or not a slotsweep checkpoint "
                          f"({one_line(exc, 160)}): use another checkpoint") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} has no state_dict: not a slotsweep checkpoint")
    return ckpt


def _load_state(module: torch.nn.Module, ckpt: dict[str, Any], path: str | Path) -> None:
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
                          + _MISFIT_HINT)


def load_weights(module: Any, ckpt: dict[str, Any], path: str | Path) -> None:
    """Put a read checkpoint's weights into a ``SlotModule``; a misfit is one ``ConfigError``."""
    module.on_load_checkpoint(ckpt)  # puts back a frozen backbone left out of the file
    try:
        _load_state(module, ckpt, path)
    except RuntimeError as exc:  # size mismatch raised by load_state_dict itself
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ConfigError(f"checkpoint {path} does not fit this model ({first[:200]}): "
                          + _MISFIT_HINT) from None


def load_into(module: Any, path: str | Path) -> dict[str, Any]:
    """Load a slotsweep checkpoint's weights into a ``SlotModule`` (one-line errors); returns
    the checkpoint dict."""
    ckpt = read_checkpoint(path)
    load_weights(module, ckpt, path)
    return ckpt


def stage_of(cfg: Config, ckpt: dict[str, Any]) -> str:
    """``resume`` when the checkpoint was trained with the same model and optimizer (the
    ``STAGE_SECTIONS``), else ``stage``: its weights start a new stage with a fresh optimizer."""
    from omegaconf import OmegaConf

    from core.training.callbacks import CONFIG_KEY

    saved = ckpt.get(CONFIG_KEY)
    if saved is None:
        return "stage"
    before = OmegaConf.to_container(OmegaConf.create(saved))
    now = OmegaConf.to_container(OmegaConf.structured(cfg))
    same = all(before.get(k) == now.get(k) for k in STAGE_SECTIONS)  # type: ignore[union-attr]
    return "resume" if same else "stage"


def with_more_steps(cfg: Config, path: str | Path) -> Config:
    """``cfg`` for continuing from the checkpoint at ``path`` where ``trainer.max_steps`` at or
    below the checkpoint's step means "that many more steps" (``--continue step=10000.ckpt
    trainer.max_steps=5000`` trains to step 15000). Only a resume (same model and optimizer)
    counts on from the checkpoint's step; otherwise ``cfg`` is returned as it is."""
    ckpt = read_checkpoint(path)
    done, total = int(ckpt.get("global_step", 0)), cfg.trainer.max_steps
    if stage_of(cfg, ckpt) != "resume" or total > done:
        return cfg
    print(f"continuing from step {done} for {total} more steps")
    return replace(cfg, trainer=replace(cfg.trainer, max_steps=done + total))


class CheckpointWriteError(SlotsweepError):
    """A checkpoint could not be written (disk full, folder gone); earlier ones are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: each file is written beside its final name and
    renamed into place, so a crash or a full disk mid-write leaves the previous checkpoints whole
    and never a truncated ``step=N.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        final = Path(path)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            earlier = sorted(final.parent.glob("step=*.ckpt"), key=os.path.getmtime)
            hint = f"; continue from {earlier[-1]} with --continue" if earlier else ""
            raise CheckpointWriteError(
                f"could not write checkpoint {final} ({exc.strerror or one_line(exc)}): earlier "
                f"checkpoints are intact; free space{hint}") from None
