"""``slotsweep finetune``: a classification head trained on the slots of a trained checkpoint.

    slotsweep finetune --checkpoint CKPT --task object_recognition [--unfreeze grouper]

Task ``object_recognition``: a clip's class is its video's ``label`` (the index's per-video
category, :mod:`core.data.layout`; generated data: its largest object's colour and shape).
Head: DeepSets, permutation-invariant over slots: a per-slot MLP (LayerNorm, Linear, GELU,
Linear), the mean over slots and time, a linear layer to the classes. The slots come from the
trained model, frozen (eval mode, no gradients) except ``--unfreeze grouper``: slot attention
then trains too, at a tenth of the head's learning rate.

Split: the head trains on the fixed clips of the train split. The val split's videos are halved
by video (never clips of one video on both sides), stratified by label and seeded: one half
chooses the best checkpoint (``val/accuracy``), the other is the test side reported
(``test/accuracy`` of the best checkpoint; chance = its majority class's share).

A Lightning run in ``--output-dir`` (default ``<run>/finetune/<task>/``): TensorBoard events,
``checkpoints/best-step=N.ckpt`` (the head and any unfrozen part; the rest is the source
checkpoint's) and ``results.json``. Importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core.errors import ConfigError, DataError
from core.names import CHECKPOINTS_DIRNAME, TRAIN_LOSS

TASKS = ("object_recognition",)
PARTS = ("grouper",)  # what --unfreeze may train besides the head
PART_LR_SCALE = 0.1  # an unfrozen part's learning rate, relative to the head's
LABEL_KEY = "label"
INFO_KEY = "slotsweep_finetune"  # in a fine-tuning checkpoint: source, task, classes, unfrozen
RESULTS_JSON = "results.json"


class LabelledClips:
    """The clips ``indices`` of a ``ClipDataset``, each sample with its video's class index."""

    def __init__(self, clips: Any, indices: Sequence[int], labels: Sequence[int]) -> None:
        self.clips, self.indices, self.labels = clips, list(indices), list(labels)
        self.video_of = [clips.clips[i][0] for i in self.indices]  # of each clip

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self.clips[self.indices[i]]
        sample[LABEL_KEY] = self.labels[sample["video_index"]]
        return sample

    def counts(self) -> dict[str, int]:
        return {"clips": len(self), "videos": len(set(self.video_of))}

    def chance(self) -> float:
        """The share of the clips' most common class."""
        return Counter(self.labels[v] for v in self.video_of).most_common(1)[0][1] / len(self)


def plural(n: int, noun: str) -> str:
    """``1 video``, ``2 videos``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def split_videos(labels: Sequence[str], seed: int) -> tuple[list[int], list[int]]:
    """Indices of videos -> (val half, test half): stratified by label, seeded, disjoint."""
    rng, order = random.Random(seed), []
    for label in sorted(set(labels)):
        group = [i for i, other in enumerate(labels) if other == label]
        rng.shuffle(group)
        order += group  # alternating below: each class is halved, the test side gets any odd one
    return sorted(order[1::2]), sorted(order[0::2])


def _check_labels(records: dict[str, list[Any]], task: str) -> list[str]:
    """The sorted classes of the labelled videos of both splits; one-line errors otherwise."""
    videos = [r for split in records.values() for r in split]
    missing = [r for r in videos if r.label is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(videos)} videos have no 'label' (first: "
                        f"{missing[0].id}) and {task} needs a category per video: add a "
                        "per-video label to the index (core/data/layout.py)")
    classes = sorted({r.label for r in videos})
    if len(classes) < 2:
        raise DataError(f"every video has the label {classes[0]!r}: {task} needs at least two "
                        "classes")
    return classes


@functools.cache
def _torch_classes() -> tuple[type, type, type]:
    """(SlotHead, FinetuneModule, StepProgress), defined on first use (torch loads here)."""
    import pytorch_lightning as pl
    import torch
    from torch import nn

    from core.text import Progress

    class SlotHead(nn.Module):
        """DeepSets over slots: per-slot MLP, mean over slots and time, linear to classes."""

        def __init__(self, dim: int, n_classes: int, hidden: int = 128) -> None:
            super().__init__()
            self.phi = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, hidden))
            self.out = nn.Linear(hidden, n_classes)

        def forward(self, slots: torch.Tensor) -> torch.Tensor:
            """(B, T, K, D) or (B, K, D) slots -> (B, n_classes) logits."""
            return self.out(self.phi(slots).flatten(1, -2).mean(dim=1))

    class FinetuneModule(pl.LightningModule):
        """A trained ``SlotVideoModel`` (frozen but for ``unfreeze``) under a ``SlotHead``."""

        def __init__(self, model: nn.Module, classes: Sequence[str], unfreeze: Sequence[str],
                     lr: float, seed: int, info: dict[str, Any]) -> None:
            super().__init__()
            self.slots, self.unfreeze, self.lr, self.seed, self.info = (
                model, tuple(unfreeze), lr, seed, info)
            model.requires_grad_(False)
            for part in self.unfreeze:
                getattr(model, part).requires_grad_(True)
            self.head = SlotHead(model.initializer(1).shape[-1], len(classes))

        def train(self, mode: bool = True) -> FinetuneModule:
            super().train(mode)
            self.slots.eval()  # the trained model always runs as in evaluation (no dropout)
            return self

        def forward(self, video: torch.Tensor, generator: Any = None) -> torch.Tensor:
            with torch.set_grad_enabled(torch.is_grad_enabled() and bool(self.unfreeze)):
                slots = self.slots({"video": video}, generator=generator)["slots"]
            return self.head(slots.float())

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self(batch["video"]), batch[LABEL_KEY])
            self.log(TRAIN_LOSS, loss, batch_size=len(batch[LABEL_KEY]))
            return loss

        def _evaluate(self, batch: dict, batch_idx: int, side: str) -> None:
            # slot initialisation may sample: the same draws at every evaluation
            generator = torch.Generator(device=self.device).manual_seed(self.seed + batch_idx)
            logits = self(batch["video"], generator)
            labels, n = batch[LABEL_KEY], len(batch[LABEL_KEY])
            self.log(f"{side}/loss", nn.functional.cross_entropy(logits, labels), batch_size=n)
            self.log(f"{side}/accuracy", (logits.argmax(-1) == labels).float().mean(), batch_size=n)

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            self._evaluate(batch, batch_idx, "val")

        def test_step(self, batch: dict, batch_idx: int) -> None:
            self._evaluate(batch, batch_idx, "test")

        def configure_optimizers(self) -> torch.optim.Optimizer:
            groups = [{"params": list(self.head.parameters()), "lr": self.lr}]
            groups += [{"params": list(getattr(self.slots, part).parameters()),
                        "lr": self.lr * PART_LR_SCALE, "weight_decay": 0.0}
                       for part in self.unfreeze]
            return torch.optim.AdamW(groups, lr=self.lr)

        def on_save_checkpoint(self, checkpoint: dict) -> None:
            """Only what was trained: the frozen rest is the source checkpoint's."""
            keep = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k in keep}
            checkpoint[INFO_KEY] = self.info

        def on_load_checkpoint(self, checkpoint: dict) -> None:
            for key, value in self.state_dict().items():
                checkpoint["state_dict"].setdefault(key, value)

    class StepProgress(pl.Callback):  # silent for short runs, a bar or lines for long ones
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.bar = Progress("fine-tuning", trainer.max_steps, "steps")

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            self.bar.update(trainer.global_step - self.bar.done)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.bar.close()

    return SlotHead, FinetuneModule, StepProgress


def slot_head(dim: int, n_classes: int, hidden: int = 128) -> Any:
    """The DeepSets head alone (an ``nn.Module``: (B, T, K, D) slots -> (B, n_classes))."""
    return _torch_classes()[0](dim, n_classes, hidden)


def _sides(cfg: Any, data_dir: str | Path | None, task: str,
           seed: int) -> tuple[list[str], dict[str, LabelledClips]]:
    """The classes, and the train, val and test clips with their labels (module docstring)."""
    from core.tools import split_clips

    train, val = cfg.dataset.train_split, cfg.dataset.val_split
    data = {split: split_clips(cfg, data_dir, split, None)[:2] for split in (train, val)}
    classes = _check_labels({split: records for split, (records, _) in data.items()}, task)
    if len(data[val][0]) < 2:
        raise DataError(f"the {val} split has {plural(len(data[val][0]), 'video')}: fine-tuning "
                        "needs at least 2 there (half choose the checkpoint, half are the test)")
    val_videos, test_videos = split_videos([r.label for r in data[val][0]], seed)
    sides = {}
    for side, split, videos in (("train", train, None), ("val", val, val_videos),
                                ("test", val, test_videos)):
        clips = data[split][1].dataset
        clips.load_masks = False  # the head needs frames and labels only
        keep = [i for i, (video, _) in enumerate(clips.clips) if videos is None or video in videos]
        sides[side] = LabelledClips(clips, keep, [classes.index(r.label) for r in data[split][0]])
    return classes, sides


def default_output_dir(checkpoint: str | Path, task: str) -> Path:
    """``<run>/finetune/<task>/`` (``<task>-2``... when taken), <run> above ``checkpoints/``."""
    parent = Path(checkpoint).resolve().parent
    base = (parent.parent if parent.name == CHECKPOINTS_DIRNAME else parent) / "finetune"
    names = (task if n == 1 else f"{task}-{n}" for n in itertools.count(1))
    return next(base / name for name in names if not any((base / name).glob("*")))


def finetune(checkpoint: str | Path, task: str = "object_recognition",
             data_dir: str | Path | None = None, output_dir: str | Path | None = None,
             unfreeze: Sequence[str] = (), max_steps: int = 200, lr: float = 1e-3,
             batch_size: int | None = None, seed: int = 0,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the ``task`` head on the slots of ``checkpoint``; returns what ``results.json``
    holds. ``say`` gets the line telling what trains and where, before training starts."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: known tasks are {', '.join(TASKS)}")
    if unknown := [part for part in unfreeze if part not in PARTS]:
        raise ConfigError(f"cannot unfreeze {unknown[0]!r}: known parts are {', '.join(PARTS)}")
    if max_steps < 1 or lr <= 0 or (batch_size is not None and batch_size < 1):
        raise ConfigError("--max-steps and --batch-size must be >= 1 and --lr > 0")
    unfreeze = tuple(dict.fromkeys(unfreeze))
    if output_dir is not None and any((Path(output_dir) / CHECKPOINTS_DIRNAME).glob("*.ckpt")):
        raise ConfigError(f"--output-dir {output_dir} already holds a fine-tuning run: pick "
                          "another folder")

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from core.data.datamodule import usable_workers
    from core.tools import load_trained
    from core.training.checkpoint import AtomicCheckpointIO
    from core.training.trainer import quiet_lightning

    quiet_lightning()
    cfg, module = load_trained(checkpoint)
    classes, sides = _sides(cfg, data_dir, task, seed)
    counts = {side: clips.counts() for side, clips in sides.items()}

    output = Path(output_dir) if output_dir is not None else default_output_dir(checkpoint, task)
    output.mkdir(parents=True, exist_ok=True)
    checkpoints = output / CHECKPOINTS_DIRNAME
    pl.seed_everything(seed, workers=True, verbose=False)
    info = {"checkpoint": str(Path(checkpoint).resolve()), "task": task, "classes": classes,
            "unfrozen": list(unfreeze)}
    _, FinetuneModule, StepProgress = _torch_classes()
    model = FinetuneModule(module.model, classes, unfreeze, lr, seed, info)
    trained = "model frozen" + (f" except its {' and '.join(unfreeze)}" if unfreeze else "")
    names = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
    known = {sides["train"].labels[v] for v in sides["train"].video_of}
    held = set(sides["val"].video_of + sides["test"].video_of)
    unseen = sum(sides["test"].labels[v] not in known for v in held)
    if say is not None:
        say(f"fine-tuning a head for {task} ({len(classes)} classes: {names}) on the slots of "
            f"{checkpoint} ({trained}), {max_steps} steps on {counts['train']['clips']} clips of "
            f"{counts['train']['videos']} train videos; checkpoints in {checkpoints}; "
            f"TensorBoard: tensorboard --logdir {output}")
        if unseen:
            say(f"note: {unseen} of {len(held)} val/test videos have a class no train video has: "
                "they cannot be recognised")

    workers, size = usable_workers(cfg.dataset.num_workers), batch_size or cfg.dataset.batch_size

    def loader(side: str, shuffle: bool = False) -> Any:
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return torch.utils.data.DataLoader(sides[side], batch_size=size, shuffle=shuffle,
                                           generator=generator, num_workers=workers,
                                           persistent_workers=workers > 0)

    val_every = max(1, min(max_steps // 5, 50))
    best = ModelCheckpoint(dirpath=checkpoints, filename="best-{step}", monitor="val/accuracy",
                           mode="max", save_top_k=1)
    logger = TensorBoardLogger(save_dir=str(output), name="", version="", default_hp_metric=False)
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator, devices=1, precision="32-true", max_steps=max_steps,
        max_epochs=-1, val_check_interval=val_every, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, log_every_n_steps=max(1, min(val_every, 10)), logger=logger,
        callbacks=[best, StepProgress()], enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(output), plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, loader("train", shuffle=True), loader("val"))
    best_path = best.best_model_path or None
    tested = trainer.test(model, loader("test"), ckpt_path=best_path, verbose=False)[0]
    results = {
        **info, "counts": counts, "test_accuracy": float(tested["test/accuracy"]),
        "chance": sides["test"].chance(),
        "best_val_accuracy": float(best.best_model_score) if best_path else None,
        "best_checkpoint": best_path, "steps": max_steps, "output_dir": str(output),
    }
    (output / RESULTS_JSON).write_text(json.dumps(results, indent=1))
    return results


def _finetune(args: argparse.Namespace) -> int:
    results = finetune(args.checkpoint, args.task, data_dir=args.data_dir,
                       output_dir=args.output_dir, unfreeze=args.unfreeze or (),
                       max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
                       seed=args.seed, say=lambda line: print(line, flush=True))
    test = results["counts"]["test"]
    print(f"test accuracy {results['test_accuracy']:.3f} on {plural(test['clips'], 'clip')} of "
          f"{plural(test['videos'], 'video')} (chance {results['chance']:.3f}); best checkpoint: "
          f"{results['best_checkpoint']}")
    return 0


def add_finetune(sub: argparse._SubParsersAction) -> None:
    """The ``finetune`` sub-parser."""
    fine = sub.add_parser(
        "finetune", help="train a classification head on the slots of a trained checkpoint",
        description="Train a head on the slots of a trained checkpoint (Lightning: checkpoints "
        "and TensorBoard in --output-dir), choose its best step on half of the val split's "
        "videos and report test accuracy on the other half.")
    fine.add_argument("--checkpoint", required=True, help="a slotsweep training checkpoint")
    fine.add_argument("--task", default=TASKS[0], help=f"known: {', '.join(TASKS)}")
    fine.add_argument("--unfreeze", action="append", choices=PARTS, default=[],
                      help="also train this part of the model (repeatable; default: none, "
                      "the model is frozen)")
    fine.add_argument("--data-dir", default=None, help="dataset root (default: the training's)")
    fine.add_argument("--output-dir", default=None, help="default: <run>/finetune/<task>/")
    fine.add_argument("--max-steps", type=int, default=200,
                      help="optimizer steps (validation every max-steps/5, at most 50)")
    fine.add_argument("--lr", type=float, default=1e-3,
                      help=f"the head's learning rate (unfrozen parts: x{PART_LR_SCALE})")
    fine.add_argument("--batch-size", type=int, default=None,
                      help="default: the checkpoint's dataset.batch_size")
    fine.add_argument("--seed", type=int, default=0,
                      help="the val/test halves, the head's initialisation, the batch order")
    fine.set_defaults(func=_finetune)

