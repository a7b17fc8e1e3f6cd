"""The ``slotsweep`` command.

Every sub-command turns bad input into one line on stderr and exit code 2; nothing the user typed
should ever end in a traceback. Heavy imports (torch, Ray, MLflow) happen inside the commands so
``slotsweep --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core.errors import SlotsweepError

EXIT_USAGE = 2


def _error_line(exc: BaseException) -> str:
    """The user-facing line of an error, also when a DataLoader worker wrapped it in a traceback."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    for prefix in ("core.errors.DataError: ", "core.errors.ConfigError: ", "DataError: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return lines[0] if len(lines) == 1 else last


def _cmd_make_data(args: argparse.Namespace) -> int:
    from core.data.synthetic import SyntheticSpec, write_synthetic_dataset

    try:
        spec = SyntheticSpec(
            n_frames=args.frames,
            size=args.size,
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            digits=args.digits,
            textured_background=args.textured_background,
            min_size=args.min_size,
            max_size=args.max_size,
            colors=args.colors,
            max_speed=args.max_speed,
        )
        last = [-1]

        def progress(done: int, total: int) -> None:
            step = max(1, total // 10)
            if total >= 50 and (done == total or done // step != last[0]):
                last[0] = done // step
                print(f"  {done}/{total} videos", file=sys.stderr)

        summary = write_synthetic_dataset(
            args.out,
            args.videos,
            spec,
            seed=args.seed,
            val_fraction=args.val_fraction,
            image_format=args.image_format,
            progress=progress,
        )
    except (ValueError, FileExistsError) as exc:
        raise SlotsweepError(str(exc)) from None
    out = Path(args.out).resolve()
    print(
        f"wrote {summary['n_train']} train + {summary['n_val']} val videos "
        f"({args.frames} frames, {args.size}x{args.size}) to {out}"
    )
    print(f"use it with: --data-dir {out}   (or dataset.json_dir={out}/json "
          f"dataset.img_dir={out}/frames dataset.mask_dir={out}/masks)")
    return 0


def _cmd_check_data(args: argparse.Namespace) -> int:
    from core.data.clips import ClipDataset
    from core.data.config import DatasetConfig, resolve_paths
    from core.data.datamodule import load_records

    cfg = DatasetConfig(
        format=args.format,
        json_dir=args.json_dir,
        img_dir=args.img_dir,
        mask_dir=args.mask_dir,
        ep_length=args.ep_length,
        img_size=args.img_size,
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


def _cmd_train(args: argparse.Namespace) -> int:
    from core.train import run_from_args

    return run_from_args(args)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.sweep import run_sweep, shutdown_ray

    try:
        return run_sweep(args.file, list(args.overrides), resume=args.resume)
    finally:
        shutdown_ray()


def _cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.submit import submit

    return submit(args.file, args.address, list(args.overrides), follow=args.follow,
                  token=args.token, mlflow_uri=args.mlflow_uri)


def _cmd_ui(args: argparse.Namespace) -> int:
    import time

    from orchestrator.tracking import LocalServer, mlflow_root

    root = Path(args.store).resolve() if args.store else mlflow_root()
    if not (root / "mlflow.db").is_file():
        raise SlotsweepError(f"no MLflow store at {root}: run a sweep first or pass --store DIR")
    with LocalServer.start(root, port=args.port) as server:
        print(f"MLflow UI: {server.uri}  (store {root}; Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)


def _cmd_promote(args: argparse.Namespace) -> int:
    from orchestrator.registry import promote

    out = promote(args.sweep, name=args.name, alias=args.alias, metric=args.metric,
                  mode=args.mode, tracking_uri=args.tracking_uri)
    print(f"registered {out['name']} version {out['version']} as @{out['alias']}: "
          f"trial {out['trial_id']} step {out['step']}, {out['metric']}={out['score']:.4f}")
    where = (f"tracking URI {out['tracking_uri']}" if out["tracking_uri"] else
             "embedded store: run `slotsweep ui`, then MLFLOW_TRACKING_URI=http://127.0.0.1:5000")
    print(f"  load it: mlflow.pyfunc.load_model('{out['uri']}')  ({where})")
    return 0


def _cmd_rerun(args: argparse.Namespace) -> int:
    from orchestrator.rerun import rerun

    out = rerun(args.run_id, list(args.overrides), tracking_uri=args.tracking_uri,
                log_dir=args.log_dir)
    print(f"rerun of {out['rerun_of']}: MLflow run {out['run_id']}, folder {out['run_dir']}")
    for key, (steps, diff) in out["comparison"].items():
        if steps:
            print(f"  {key}: {steps} steps compared with the original, max |diff| {diff:.3g}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from core.tools import extract_features

    path = extract_features(args.checkpoint, args.output_dir, data_dir=args.data_dir,
                            split=args.split, batch_size=args.batch_size)
    print(f"wrote {path} (slots of every {args.split} clip; index in {path.with_suffix('.json')})")
    return 0


def _cmd_cache_features(args: argparse.Namespace) -> int:
    import time

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
          f"{human_bytes(cache.nbytes)}; ready in {time.time() - start:.1f} s"
          f"{' (every shard re-hashed)' if args.verify else ''}")
    if cfg.feature_cache.mode == "off":
        print("  note: this config has feature_cache.mode=off, so training will not read it")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    from core.tools import visualize

    paths = visualize(args.checkpoint, args.output_dir, data_dir=args.data_dir,
                      clips=args.clips, split=args.split)
    print(f"wrote {len(paths)} images to {paths[0].parent if paths else args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from core.train import build_parser as build_train_parser

    parser = argparse.ArgumentParser(
        prog="slotsweep",
        description="Train slot-attention video models and sweep their hyperparameters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train one model (the seed's train_integrated.py)",
        description="Train one model. Overrides are dotted keys: globals.NUM_SLOTS=10, "
        "grouper.n_iters=5, losses.loss_ss.temperature=0.05, trainer.precision=16.",
    )
    build_train_parser(train)
    train.set_defaults(func=_cmd_train)

    sweep = sub.add_parser(
        "sweep", help="run a sweep file on Ray Tune (local Ray, embedded MLflow by default)",
        description="Run a sweep. key=value after the file overrides sweep fields (trials=8, "
        "concurrency=1, resources.gpus_per_trial=0.5) or, for any other key, the trials' config.",
    )
    sweep.add_argument("file", help="sweep YAML (a path, or a name in sweeps/)")
    sweep.add_argument("overrides", nargs="*", help="key=value")
    sweep.add_argument("--resume", action="store_true",
                       help="finish an interrupted sweep: finished trials are kept, interrupted "
                       "ones continue from their last checkpoint")
    sweep.set_defaults(func=_cmd_sweep)

    subm = sub.add_parser(
        "submit", help="run a sweep file as a Ray job on a cluster (Jobs API)",
        description="Submit a sweep to a Ray cluster: the project is uploaded and the head runs "
        "`slotsweep sweep FILE key=value ...`. The cluster needs an MLflow server every node can "
        "reach (--mlflow-uri, mlflow.tracking_uri or MLFLOW_TRACKING_URI).",
    )
    subm.add_argument("file", help="sweep YAML inside the project (a path, or a name in sweeps/)")
    subm.add_argument("overrides", nargs="*", help="key=value, as for `slotsweep sweep`")
    subm.add_argument("--address", default=None,
                      help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    subm.add_argument("--follow", action="store_true",
                      help="stream the job's logs; exit 0 if it succeeded, else 1")
    subm.add_argument("--token", default=None,
                      help="the cluster's token (`ray get-auth-token` on the head; default: "
                      "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    subm.add_argument("--mlflow-uri", default=None,
                      help="MLflow server for the job (default: the file's, $MLFLOW_TRACKING_URI)")
    subm.set_defaults(func=_cmd_submit)

    prom = sub.add_parser(
        "promote", help="register a sweep's best checkpoint in the MLflow Model Registry")
    prom.add_argument("sweep", help="sweep name (runs/sweeps/NAME), folder or best.json")
    prom.add_argument("--metric", default=None, help="select by this metric instead (val/mbo)")
    prom.add_argument("--mode", choices=("max", "min"), default=None)
    prom.add_argument("--name", default=None, help="registered model name (default: the sweep's)")
    prom.add_argument("--alias", default="champion")
    prom.add_argument("--tracking-uri", default=None)
    prom.set_defaults(func=_cmd_promote)

    rer = sub.add_parser("rerun", help="train one trial again locally (no Ray) from its MLflow run")
    rer.add_argument("run_id", help="the trial's MLflow run id")
    rer.add_argument("overrides", nargs="*", help="key=value config overrides")
    rer.add_argument("--tracking-uri", default=None)
    rer.add_argument("--log-dir", default="runs/reruns")
    rer.set_defaults(func=_cmd_rerun)

    ui = sub.add_parser("ui", help="serve the embedded MLflow store (runs/mlflow) in a browser")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--store", default=None, help="MLflow folder (default: runs/mlflow)")
    ui.set_defaults(func=_cmd_ui)

    ext = sub.add_parser("extract-features", help="slots of every clip of a split, from a "
                         "trained checkpoint (the seed's extract_features.py)")
    ext.add_argument("--checkpoint", required=True)
    ext.add_argument("--data-dir", default=None, help="dataset root (default: the training's)")
    ext.add_argument("--output-dir", default="features")
    ext.add_argument("--split", default="val")
    ext.add_argument("--batch-size", type=int, default=None)
    ext.set_defaults(func=_cmd_extract)

    vis = sub.add_parser("visualize", help="slot masks of a trained checkpoint as images "
                         "(the seed's visualize_slots.py)")
    vis.add_argument("--checkpoint", required=True)
    vis.add_argument("--data-dir", default=None, help="dataset root (default: the training's)")
    vis.add_argument("--output-dir", default=None,
                     help="default: <run>/visualizations/<checkpoint name>/")
    vis.add_argument("--clips", type=int, default=4)
    vis.add_argument("--split", default="val")
    vis.set_defaults(func=_cmd_visualize)

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
    cache.set_defaults(func=_cmd_cache_features)

    make = sub.add_parser("make-data", help="write a generated dataset to disk")
    make_sub = make.add_subparsers(dest="kind", metavar="KIND", required=True)
    syn = make_sub.add_parser(
        "synthetic", help="moving disks/squares/triangles (and digits) with instance masks"
    )
    syn.add_argument("--out", required=True, help="output directory (empty or a previous one)")
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
    syn.set_defaults(func=_cmd_make_data)

    check = sub.add_parser("check-data", help="read and check a dataset as training would")
    check.add_argument("--data-dir", default=None, help="dataset root (json/, frames/, masks/)")
    check.add_argument("--format", choices=("saycam", "folders"), default="saycam")
    check.add_argument("--json-dir", default=None)
    check.add_argument("--img-dir", default=None)
    check.add_argument("--mask-dir", default=None)
    check.add_argument("--ep-length", type=int, default=8)
    check.add_argument("--img-size", type=int, default=224)
    check.add_argument("--check-images", choices=("first", "all", "none"), default="all")
    check.set_defaults(func=_cmd_check_data)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slotsweep`` console script."""
    from core.train import parse_args

    parser = build_parser()
    args = parse_args(parser, argv)
    try:
        return int(args.func(args))
    except SlotsweepError as exc:
        print(f"slotsweep: error: {_error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("slotsweep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
