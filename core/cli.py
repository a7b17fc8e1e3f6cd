"""The commands of ``slotsweep`` that need ``core`` alone: train, extract-features, visualize,
cache-features, make-data and check-data. Each ``add_<command>(subparsers)`` adds its
sub-parser next to the code it runs; ``orchestrator.cli`` puts them beside its own commands and
``python -m core.train`` runs :func:`train_main`.

Every command turns bad input into one line on stderr and exit code 2 (:func:`run`); nothing the
user typed should ever end in a traceback. Heavy imports (torch) happen inside the commands so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.errors import SlotsweepError
from core.paths import given_dir, writable_dir

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def error_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in ("core.errors.DataError: ", "core.errors.ConfigError: ", "DataError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return lines[0] if len(lines) == 1 else last


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


# Folders every command may be given, by argparse destination: written to, or read (a dataset).
WRITTEN_DIRS = {"log_dir": "--log-dir", "output_dir": "--output-dir", "out": "--out"}
READ_DIRS = {"data_dir": "--data-dir", "json_dir": "--json-dir", "img_dir": "--img-dir",
             "mask_dir": "--mask-dir", "images": "--images"}


def check_dirs(args: argparse.Namespace) -> None:
    """Refuse an unusable folder flag of any command in one line, before the command starts."""
    for dest, flag in WRITTEN_DIRS.items():
        if getattr(args, dest, None) is not None:
            writable_dir(getattr(args, dest), flag)
    for dest, flag in READ_DIRS.items():
        if getattr(args, dest, None) is not None:
            given_dir(getattr(args, dest), flag)


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run the chosen command (``args.func``); returns its exit code."""
    args = parse_args(parser, argv)
    try:
        check_dirs(args)
        return int(args.func(args))
    except SlotsweepError as exc:
        print(f"slotsweep: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the disk or a folder failed under a running command
        where = f": {exc.filename}" if exc.filename else ""
        print(f"slotsweep: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("slotsweep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------------------------- train
TRAIN_DESCRIPTION = ("Train one model. Overrides are dotted keys: globals.NUM_SLOTS=10, "
                     "grouper.n_iters=5, losses.loss_ss.temperature=0.05, trainer.precision=16.")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    """``slotsweep train``: prints a summary, returns an exit code (3: the loss diverged)."""
    from core.config import load_config
    from core.errors import NonFiniteLossError
    from core.train import LoaderKilledError, TrainingInterruptedError, train
    from core.training.checkpoint import with_more_steps
    from core.training.trainer import DEFAULT_SELECT, is_rank_zero

    overrides = list(args.overrides)
    if args.use_optimizations:
        overrides.append("trainer.use_optimizations=true")
    cfg = load_config(args.config, overrides)
    try:
        if args.continue_from is not None:
            cfg = with_more_steps(cfg, args.continue_from)
        result = train(cfg, data_dir=args.data_dir, log_dir=args.log_dir,
                       continue_from=args.continue_from)
    except NonFiniteLossError as exc:
        print(f"slotsweep: training stopped: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (LoaderKilledError, TrainingInterruptedError) as exc:
        again = (f"; continue with: slotsweep train {args.config} --continue {exc.checkpoint}"
                 if exc.checkpoint is not None else "")
        print(f"slotsweep: training stopped: {exc}{again}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, TrainingInterruptedError) else 1
    if not is_rank_zero():
        return 0
    print(f"run: {result['run_dir']} ({result['global_step']} steps)")
    shown = {k: v for k, v in sorted(result["metrics"].items()) if "/" in k}
    print("  " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    if result["best_checkpoint"]:
        print(f"best {DEFAULT_SELECT[0]}={result['best_score']:.4f}: {result['best_checkpoint']}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    _train_arguments(sub.add_parser("train", help="train one model",
                                    description=TRAIN_DESCRIPTION))


def train_parser() -> argparse.ArgumentParser:
    """The ``train`` command's parser on its own (``python -m core.train``)."""
    parser = argparse.ArgumentParser(prog="slotsweep train", description=TRAIN_DESCRIPTION)
    _train_arguments(parser)
    return parser


def train_main(argv: Sequence[str] | None = None) -> int:
    """``python -m core.train CONFIG [key=value ...]``: ``slotsweep train`` without the
    orchestrator."""
    return run(train_parser(), argv)


# ------------------------------------------------------------- tools on a trained checkpoint
def _extract(args: argparse.Namespace) -> int:
    from core.downstream.features import extract_features

    path = extract_features(args.checkpoint, args.output_dir, data_dir=args.data_dir,
                            split=args.split, batch_size=args.batch_size, images=args.images)
    what = f"image in {args.images}" if args.images else f"{args.split} clip"
    print(f"wrote {path} (slots of every {what}, with the baselines' features and the objects "
          f"matched to slots; summary in {path.with_suffix('.json')})")
    return 0


def add_extract_features(sub: argparse._SubParsersAction) -> None:
    ext = sub.add_parser("extract-features",
                         help="slots of every clip of a split, from a trained checkpoint")
    ext.add_argument("--checkpoint", required=True)
    ext.add_argument("--data-dir", default=None, help="dataset root (default: the training's)")
    ext.add_argument("--images", default=None, help="instead: a labelled image set "
                     "ROOT/<category>/*.jpg, each image a one-frame clip (writes images.pt)")
    ext.add_argument("--output-dir", default="features")
    ext.add_argument("--split", default="val")
    ext.add_argument("--batch-size", type=int, default=None)
    ext.set_defaults(func=_extract)


def _visualize(args: argparse.Namespace) -> int:
    from core.tools import visualize

    paths = visualize(args.checkpoint, args.output_dir, data_dir=args.data_dir,
                      clips=args.clips, split=args.split)
    print(f"wrote {len(paths)} images to {paths[0].parent if paths else args.output_dir}")
    return 0


def add_visualize(sub: argparse._SubParsersAction) -> None:
    vis = sub.add_parser("visualize", help="slot masks of a trained checkpoint as images")
    vis.add_argument("--checkpoint", required=True)
    vis.add_argument("--data-dir", default=None, help="dataset root (default: the training's)")
    vis.add_argument("--output-dir", default=None,
                     help="default: <run>/visualizations/<checkpoint name>/")
    vis.add_argument("--clips", type=int, default=4)
    vis.add_argument("--split", default="val")
    vis.set_defaults(func=_visualize)


def _cache_features(args: argparse.Namespace) -> int:
    from core.config import load_config
    from core.data.feature_cache.reader import human_bytes
    from core.tools import cache_features

    cfg = load_config(args.config, list(args.overrides))
    start = time.time()
    cache = cache_features(cfg, data_dir=args.data_dir, verify=args.verify)
    info = cache.manifest["key_inputs"]
    frames = {name: split.frames for name, split in cache.splits.items()}
    print(f"feature cache: {cache.root}")
    print(f"  {info['backbone']} weights {info['weights_hash']}, block {info['layer']}, "
          f"{info['img_size']} px, {info['dtype']}; frames {frames}; "
          f"{human_bytes(cache.nbytes)}; ready in {time.time() - start:.1f} s")
    if args.verify:  # open_cache(full_check=True) raised a CacheError on any mismatch
        shards = sum(len(split["shards"]) for split in cache.manifest["splits"].values())
        print(f"  verified: OK, all {shards} shards ({human_bytes(cache.nbytes)}) re-hashed "
              f"and each matches its blake2b digest in the manifest; sizes, shapes and frame "
              f"counts agree")
    if cfg.feature_cache.mode == "off":
        print("  note: this config has feature_cache.mode=off, so training will not read it")
    return 0


def add_cache_features(sub: argparse._SubParsersAction) -> None:
    cache = sub.add_parser(
        "cache-features", help="compute the frozen backbone's features of a dataset once; "
        "training and sweeps then read them instead of running the backbone",
        description="Build (or find and check) the feature cache of a config's dataset. "
        "Training uses it automatically when its key (backbone, weights, layer, image size, "
        "normalisation, frame files) matches.")
    cache.add_argument("config", help="YAML config (a path or a shipped name)")
    cache.add_argument("overrides", nargs="*", help="key=value, as for train")
    cache.add_argument("--data-dir", default=None, help="dataset root, as for train")
    cache.add_argument("--verify", action="store_true",
                       help="re-hash every shard of an existing cache")
    cache.set_defaults(func=_cache_features)


# ---------------------------------------------------------------------------------- data
def _make_data(args: argparse.Namespace) -> int:
    from core.data.synthetic import SyntheticSpec, is_synthetic_dataset, write_synthetic_dataset
    from core.text import Progress

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and is_synthetic_dataset(out):
        if not args.force:
            raise SlotsweepError(f"{out} already holds a generated dataset: add --force to "
                                 "replace it, or pick another --out")
        print(f"replacing the generated dataset in {out} (--force)", file=sys.stderr)
    try:
        spec = SyntheticSpec.from_options(args)
        with Progress("generating videos", args.videos, "videos") as bar:
            summary = write_synthetic_dataset(
                args.out, args.videos, spec, seed=args.seed, val_fraction=args.val_fraction,
                image_format=args.image_format,
                progress=lambda done, total: bar.update(done - bar.done))
    except (ValueError, FileExistsError) as exc:
        raise SlotsweepError(str(exc)) from None
    out = out.resolve()
    print(f"wrote {summary['n_train']} train + {summary['n_val']} val videos "
          f"({args.frames} frames, {args.size}x{args.size}) to {out}")
    print(f"use it with: --data-dir {out}   (or dataset.json_dir={out}/json "
          f"dataset.img_dir={out}/frames dataset.mask_dir={out}/masks)")
    return 0


def add_make_data(sub: argparse._SubParsersAction) -> None:
    make = sub.add_parser("make-data", help="write a generated dataset to disk")
    make_sub = make.add_subparsers(dest="kind", metavar="KIND", required=True)
    syn = make_sub.add_parser(
        "synthetic", help="moving disks/squares/triangles (and digits) with instance masks"
    )
    syn.add_argument("--out", required=True,
                     help="output directory: empty, or a generated dataset with --force")
    syn.add_argument("--force", action="store_true",
                     help="replace the generated dataset already in --out")
    syn.add_argument("--videos", type=int, default=64, help="number of videos (train + val)")
    syn.add_argument("--frames", type=int, default=8, help="frames per video")
    syn.add_argument("--size", type=int, default=64, help="frame height and width in pixels")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--val-fraction", type=float, default=0.25)
    syn.add_argument("--min-objects", type=int, default=2)
    syn.add_argument("--max-objects", type=int, default=6)
    syn.add_argument("--digits", action="store_true", help="also draw digit sprites")
    syn.add_argument("--textured-background", action="store_true")
    syn.add_argument("--min-size", type=float, default=0.12,
                     help="smallest object half-extent, as a fraction of --size")
    syn.add_argument("--max-size", type=float, default=0.3)
    syn.add_argument("--max-speed", type=float, default=None,
                     help="pixels per frame (default 0.06 * --size)")
    syn.add_argument("--colors", type=int, default=None,
                     help="draw object colours from this many palette colours, shared between "
                          "objects (default: every object its own colour)")
    syn.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    syn.set_defaults(func=_make_data)


def _check_data(args: argparse.Namespace) -> int:
    from core.data.clips import ClipDataset
    from core.data.config import DatasetConfig, resolve_paths
    from core.data.datamodule import load_records

    cfg = DatasetConfig(
        format=args.format, json_dir=args.json_dir, img_dir=args.img_dir,
        mask_dir=args.mask_dir, ep_length=args.ep_length, img_size=args.img_size,
        check_images=args.check_images,
    )
    cfg.validate()
    cfg = resolve_paths(cfg, args.data_dir)
    for split, train in ((cfg.train_split, True), (cfg.val_split, False)):
        records = load_records(cfg, split)
        frames = sum(len(r) for r in records)
        masks = "with masks" if records[0].masks is not None else "no masks"
        clips = len(ClipDataset(records, cfg.ep_length, cfg.img_size, train=train))
        kind = "random clips/epoch" if train else "fixed clips"
        print(f"{split:>5}: {len(records)} videos, {frames} frames, {masks}, {clips} {kind}")
    print(f"ok: every video has >= {cfg.ep_length} frames and its files are readable "
          f"(checked: {cfg.check_images})")
    return 0


def add_check_data(sub: argparse._SubParsersAction) -> None:
    check = sub.add_parser("check-data", help="read and check a dataset as training would")
    check.add_argument("--data-dir", default=None, help="dataset root (json/, frames/, masks/)")
    check.add_argument("--format", choices=("saycam", "folders"), default="saycam")
    check.add_argument("--json-dir", default=None)
    check.add_argument("--img-dir", default=None)
    check.add_argument("--mask-dir", default=None)
    check.add_argument("--ep-length", type=int, default=8)
    check.add_argument("--img-size", type=int, default=224)
    check.add_argument("--check-images", choices=("first", "all", "none"), default="all")
    check.set_defaults(func=_check_data)
