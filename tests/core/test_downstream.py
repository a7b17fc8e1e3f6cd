"""slotsweep evaluate: the tasks on features whose answer is known, and on a real tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fake_features import made_features
from PIL import Image

from core.downstream.evaluate import evaluate, four_way_episodes, size_terciles, wilson
from core.downstream.features import load_features, match_objects
from core.errors import DataError
from orchestrator.cli import main


def test_a_probe_finds_a_label_the_slots_carry_and_not_one_they_do_not():
    result = evaluate(made_features(), "linear_probe")
    m = result["metrics"]
    assert m["accuracy"] > 0.95 and m["macro_f1"] > 0.95
    assert m["backbone/accuracy"] < 0.45 and m["untrained/accuracy"] < 0.45  # 6 classes: ~0.17
    assert m["object_shape_accuracy"] > 0.9 and m["backbone/object_shape_accuracy"] < 0.6
    assert "object_color_accuracy" not in m  # every object white: nothing to predict
    level = result["levels"][0]
    assert level["train_videos"] + level["test_videos"] == 120
    shuffled = made_features()
    shuffled["labels"] = list(np.random.default_rng(1).permutation(shuffled["labels"]))
    # shuffled across clips: a video's two clips no longer share a label, nothing to learn
    assert evaluate(shuffled, "linear_probe")["metrics"]["accuracy"] < 0.4


def test_the_split_never_puts_one_video_on_both_sides():
    from core.downstream.evaluate import split_by_video

    groups = np.array([f"v{i // 3}" for i in range(60)], dtype=object)
    labels = np.array([str(i // 3 % 4) for i in range(60)], dtype=object)
    train, test = split_by_video(labels, groups, seed=0)
    assert not set(groups[train]) & set(groups[test])
    assert 0.15 < len(test) / 60 < 0.35


def test_four_way_and_few_shot_near_perfect_on_carried_labels_and_at_chance_on_noise():
    features = made_features()
    four = evaluate(features, "4way_classification", episodes=1000)
    assert four["metrics"]["accuracy"] > 0.95
    low, high = four["metrics"]["backbone/accuracy_low"], four["metrics"]["backbone/accuracy_high"]
    assert low < 0.25 + 0.05 and high > 0.25 - 0.05  # noise: its interval holds chance (about)
    shots = evaluate(features, "few_shot", episodes=300)
    assert shots["metrics"]["1shot_accuracy"] > 0.9 and shots["metrics"]["5shot_accuracy"] > 0.95
    assert abs(shots["metrics"]["untrained/5shot_accuracy"] - 0.2) < 0.06  # 5-way chance


def test_episodes_are_reproducible_with_a_seed():
    features = made_features(signal=0.3)
    a = evaluate(features, "4way_classification", seed=3, episodes=200)["metrics"]
    b = evaluate(features, "4way_classification", seed=3, episodes=200)["metrics"]
    c = evaluate(features, "4way_classification", seed=4, episodes=200)["metrics"]
    assert a == b and a != c
    labels = np.array(features["labels"], dtype=object)
    groups = np.array(features["video_ids"], dtype=object)
    table = four_way_episodes(labels, groups, 50, seed=0)
    for query, *candidates, right in table:
        positive = candidates[right]
        assert labels[positive] == labels[query] and groups[positive] != groups[query]
        others = [labels[c] for i, c in enumerate(candidates) if i != right]
        assert len(set(others)) == 3 and labels[query] not in others
    assert evaluate(features, "few_shot", seed=3, episodes=50)["metrics"] == \
        evaluate(features, "few_shot", seed=3, episodes=50)["metrics"]


def test_interval_and_terciles():
    low, high = wilson(250, 1000)
    assert low < 0.25 < high and high - low < 0.06
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert list(size_terciles([1, 2, 3, 4, 5, 6])) == ["small", "small", "medium", "medium",
                                                        "large", "large"]


def test_matching_picks_the_slot_that_covers_the_object():
    true = torch.zeros(1, 2, 8, 8, dtype=torch.long)
    true[:, :, :4, :4] = 1  # object 1 top-left, object 2 bottom-right
    true[:, :, 4:, 4:] = 2
    masks = torch.zeros(1, 2, 3, 2, 2)
    masks[:, :, 2, 0, 0] = 1.0  # slot 2 covers the top-left patch
    masks[:, :, 0, 1, 1] = 1.0  # slot 0 the bottom-right one
    masks[:, :, 1, 0, 1] = masks[:, :, 1, 1, 0] = 1.0
    pairs, slots, weights = match_objects(masks, true)
    assert pairs == [(0, 1), (0, 2)] and slots == [2, 0]
    assert weights.shape == (2, 2, 2, 2) and float(weights[0, 0, 0, 0]) == 1.0


def _save(features: dict, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(features, path)


@pytest.mark.parametrize("case, needle", [
    ("no labels", "have no 'label'"),
    ("one class", "one class only"),
    ("too few for 5-shot", "needs at least 2 categories with 6 videos"),
    ("three categories", "4way_classification needs at least 4 categories"),
    ("another model", "come from different models"),
    ("old file", "is not a slotsweep.features/v2 features file"),
    ("nothing there", "no features at"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, needle):
    features = made_features(videos=40)
    task = "linear_probe"
    if case == "no labels":
        features["labels"] = [None] * len(features["labels"])
    elif case == "one class":
        features["labels"] = ["cat"] * len(features["labels"])
    elif case == "too few for 5-shot":
        features = made_features(videos=8, classes=4)
        task = "few_shot"
    elif case == "three categories":
        features = made_features(videos=40, classes=3)
        task = "4way_classification"
    elif case == "another model":
        _save({**features, "split": "train", "checkpoint": "other.ckpt"}, tmp_path / "f/train.pt")
    elif case == "old file":
        features = {"slots": features["slots"]}
    if case != "nothing there":
        _save(features, tmp_path / "f" / "val.pt")
    code = main(["evaluate", "--features", str(tmp_path / "f"), "--task", task])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and "\n" not in err, err


def test_train_and_val_files_are_joined_and_a_video_in_both_is_refused(tmp_path):
    features = made_features(videos=40)
    half = len(features["video_ids"]) // 2
    parts = {"train": slice(0, half), "val": slice(half, None)}
    for split, part in parts.items():
        keep = [i for i, r in enumerate(features["object_rows"])
                if (part.start or 0) <= r["clip"] < (part.stop or 10**9)]
        rows = [features["object_rows"][i] for i in keep]
        rows = [{**r, "clip": r["clip"] - (part.start or 0)} for r in rows]
        piece = {**features, "split": split, "object_rows": rows,
                 "object_slot": features["object_slot"][keep],
                 "object_untrained_slot": features["object_untrained_slot"][keep],
                 "object_backbone": features["object_backbone"][keep]}
        for key in ("slots", "untrained_slots", "backbone"):
            piece[key] = features[key][part]
        for key in ("video_ids", "starts", "labels", "n_objects"):
            piece[key] = features[key][part]
        _save(piece, tmp_path / "f" / f"{split}.pt")
    joined = load_features(tmp_path / "f")
    assert joined["split"] == "train+val" and len(joined["video_ids"]) == 2 * half
    assert joined["object_rows"] == features["object_rows"]
    assert torch.equal(joined["slots"], features["slots"])
    clash = torch.load(tmp_path / "f" / "train.pt", weights_only=False)
    clash["split"], clash["video_ids"][0] = "extra", features["video_ids"][-1]
    _save(clash, tmp_path / "f" / "x.pt")
    with pytest.raises(DataError, match="is in both"):
        load_features(tmp_path / "f")


def test_evaluate_a_trained_checkpoint_and_a_labelled_image_folder(tmp_path, monkeypatch, capsys):
    from core.config import load_config
    from core.train import train

    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path / "cache"))
    ckpt = train(load_config("tiny"), run_dir=tmp_path / "run",
                 progress_bar=False)["checkpoints"][-1]
    out = tmp_path / "probe.json"
    assert main(["evaluate", "--checkpoint", ckpt, "--task", "linear_probe",
                 "--label", "n_objects", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear_probe on 16 clips of 8 videos (train+val" in printed
    for row in ("slots (trained)", "untrained slot model", "backbone mean-pooled",
                "object shape", "object size"):
        assert row in printed
    result = json.loads(out.read_text())
    assert 0 <= result["metrics"]["accuracy"] <= 1 and "backbone/object_shape_accuracy" in \
        result["metrics"]
    features = tmp_path / "features"
    assert main(["extract-features", "--checkpoint", ckpt, "--output-dir", str(features)]) == 0
    val = torch.load(features / "val.pt", weights_only=False)
    assert val["slots"].shape == (4, 2, 3, 16) and val["untrained_slots"].shape == (4, 2, 3, 16)
    assert all(" " in label for label in val["labels"])  # "<colour> <shape>" of generated data
    assert len(val["object_rows"]) == len(val["object_slot"]) == len(val["object_backbone"]) > 0
    assert not torch.equal(val["slots"], val["untrained_slots"])
    images = tmp_path / "labelled"
    for category in ("ball", "car", "cat", "cup"):
        (images / category).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (80 * i, 40, 200)).save(images / category / f"{i}.jpg")
    assert main(["extract-features", "--checkpoint", ckpt, "--images", str(images),
                 "--output-dir", str(tmp_path / "img")]) == 0
    data = torch.load(tmp_path / "img" / "images.pt", weights_only=False)
    assert data["slots"].shape[:2] == (8, 1)
    assert sorted(set(data["labels"])) == ["ball", "car", "cat", "cup"]
    assert data["object_rows"] == []
    # the published protocol on a labelled image set: 4-way straight from the checkpoint
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", ckpt, "--images", str(images), "--task",
                 "4way_classification", "--episodes", "200"]) == 0
    printed = capsys.readouterr().out
    assert "4way_classification on 8 clips of 8 videos (images;" in printed
    assert "200 episodes over 4 categories" in printed
