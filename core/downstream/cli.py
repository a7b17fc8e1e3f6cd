"""``slotsweep evaluate``: a downstream task on extracted features (or on a checkpoint, extracting
on the fly), its table on the terminal and, with ``--output``, its numbers as JSON.

    slotsweep evaluate --features ./features --task 4way_classification
    slotsweep evaluate --checkpoint CKPT [--data-dir D | --images ROOT] --task linear_probe
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from core.downstream import CLIP_LABELS, REPRESENTATIONS, TASKS
from core.errors import ConfigError
from core.text import format_table


def features_of(checkpoint: str | Path, data_dir: str | Path | None = None,
                images: str | Path | None = None, splits: tuple[str, ...] = ("train", "val"),
                output_dir: str | Path | None = None) -> dict[str, Any]:
    """Extract a checkpoint's features (every split, or the image set) and load them joined;
    kept in ``output_dir`` when given, else in a temporary folder."""
    from core.downstream.features import extract_features, load_features

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(output_dir) if output_dir is not None else Path(tmp)
        if images is not None:
            extract_features(checkpoint, folder, images=images)
        for split in splits if images is None else ():
            extract_features(checkpoint, folder, data_dir=data_dir, split=split)
        return load_features(folder)


def _scores(result: dict[str, Any], pick: Any) -> list[list[str]]:
    return [[label, *pick(result, name)] for name, label in REPRESENTATIONS.items()]


def describe(result: dict[str, Any], features: dict[str, Any]) -> str:
    """The result as the terminal shows it: what was measured, then one row per representation."""
    clips, videos = len(features["video_ids"]), len(set(features["video_ids"]))
    head = (f"{result['task']} on {clips} clips of {videos} videos ({features['split']}; "
            f"{features['checkpoint']}), label {result['label']!r}, seed {result['seed']}")
    if result["task"] == "linear_probe":
        rows = []
        for level in result["levels"]:
            for i, (name, label) in enumerate(REPRESENTATIONS.items()):
                score = level["scores"][name]
                rows.append([level["level"] if i == 0 else "",
                             str(level["classes"]) if i == 0 else "",
                             f"{level['train']}/{level['test']}" if i == 0 else "", label,
                             f"{score['accuracy']:.3f}", f"{score['macro_f1']:.3f}",
                             f"{score['chance']:.3f}", f"{score['C']:g}"])
        table = format_table(["predicts", "classes", "train/test", "representation",
                              "accuracy", "macro-F1", "chance", "C"], rows)
        return (f"{head}\nsplit by video: a quarter of the videos held out for the test; C by "
                f"3-fold cross-validation on the rest\n{table}")
    if result["task"] == "4way_classification":
        rows = _scores(result, lambda r, n: [f"{r['scores'][n]['accuracy']:.3f}",
                                              f"[{r['scores'][n]['low']:.3f}, "
                                              f"{r['scores'][n]['high']:.3f}]"])
        table = format_table(["representation", "accuracy", "95% interval"], rows)
        return (f"{head}\n{result['episodes']} episodes over {result['classes']} categories: "
                f"a query, one candidate of its category (another video) and three of others; "
                f"chance 0.250\n{table}")
    shots = result["shots"]
    ways = result["scores"]["slots"][shots[0]]["ways"]
    rows = _scores(result, lambda r, n: [f"{r['scores'][n][k]['accuracy']:.3f} ± "
                                         f"{r['scores'][n][k]['ci95']:.3f}" for k in shots])
    table = format_table(["representation", *(f"{k}-shot" for k in shots)], rows)
    return (f"{head}\n{result['episodes']} episodes of {ways}-way nearest prototype over "
            f"{result['classes']} categories (± 95% interval); chance {1 / ways:.3f}\n{table}")


def _evaluate(args: argparse.Namespace) -> int:
    from core.downstream.evaluate import evaluate
    from core.downstream.features import load_features

    if (args.features is None) == (args.checkpoint is None):
        raise ConfigError("give --features DIR (from slotsweep extract-features) or "
                          "--checkpoint CKPT, one of the two")
    if args.checkpoint is None and (args.data_dir or args.images):
        raise ConfigError("--data-dir and --images go with --checkpoint (features are already "
                          "extracted)")
    shots = parse_shots(args.shots)
    features = (load_features(args.features) if args.features is not None else
                features_of(args.checkpoint, args.data_dir, args.images))
    result = evaluate(features, args.task, args.label, args.seed, args.episodes, shots)
    print(describe(result, features))
    if args.output:
        path = Path(args.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "checkpoint": features["checkpoint"]}, indent=1,
                                   default=str))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def parse_shots(text: str) -> tuple[int, ...]:
    """``--shots 1,5`` -> (1, 5); anything else is one line."""
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise ConfigError(f"--shots {text!r}: give numbers like 1,5") from None


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """What a task is run with, the same for ``evaluate`` and ``evaluate-sweep``."""
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--label", default="label", choices=CLIP_LABELS,
                        help="clip label: the video's category, or its number of objects")
    parser.add_argument("--seed", type=int, default=0, help="split and episodes")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--shots", default="1,5", help="few_shot: k of the k-shot episodes")


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate", help="downstream tasks on a model's slots (linear probe, 4-way, few-shot)",
        description="What the slots are good for, next to the frozen backbone's mean-pooled "
        "features and an untrained slot model on the same split.")
    ev.add_argument("--features", default=None,
                    help="folder of slotsweep extract-features files (all *.pt in it are used)")
    ev.add_argument("--checkpoint", default=None, help="extract train and val on the fly instead")
    ev.add_argument("--data-dir", default=None, help="with --checkpoint: dataset root")
    ev.add_argument("--images", default=None,
                    help="with --checkpoint: labelled images ROOT/<category>/*.jpg")
    add_task_arguments(ev)
    ev.add_argument("--output", default=None, help="also write the numbers as JSON here")
    ev.set_defaults(func=_evaluate)
