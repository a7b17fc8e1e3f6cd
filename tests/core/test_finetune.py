"""``slotsweep finetune``: a DeepSets head on the slots of a trained tiny checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from core.config import load_config
from core.downstream.finetune import INFO_KEY, slot_head, split_videos
from core.train import train
from orchestrator.cli import main

RESULT_LINE = re.compile(r"test accuracy (\d\.\d{3}) on \d+ clips? of \d+ videos? "
                         r"\(chance (\d\.\d{3})\); best checkpoint: (\S+\.ckpt)$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained checkpoint, and the generated dataset it was trained on."""
    root = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLOTSWEEP_CACHE", str(root / "cache"))
        result = train(load_config("tiny"), run_dir=root / "run", progress_bar=False)
        (data,) = (root / "cache" / "data").glob("synthetic-*")
        yield result["checkpoints"][-1], data


def _capture_model(monkeypatch):
    """The SlotModule fine-tuning loads, kept to compare with the checkpoint afterwards."""
    import core.tools

    loaded, real = [], core.tools.load_trained

    def load(checkpoint):
        cfg, module = real(checkpoint)
        loaded.append(module)
        return cfg, module

    monkeypatch.setattr(core.tools, "load_trained", load)
    return loaded


def _changed(before, after) -> set[str]:
    """Names of the model's tensors (parameters and buffers) that differ."""
    after = after.state_dict()
    return {name for name, value in before.state_dict().items()
            if not torch.equal(value, after[name])}


def test_finetune_cli_trains_the_head_alone(trained, tmp_path, monkeypatch, capsys):
    from core.tools import load_trained

    ckpt, data = trained
    labels = {split: [video["label"] for video in json.loads(
        (data / "json" / f"{split}.json").read_text())["videos"]] for split in ("train", "val")}
    classes = sorted({*labels["train"], *labels["val"]})
    unseen = sum(label not in labels["train"] for label in labels["val"])
    loaded = _capture_model(monkeypatch)
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", ckpt, "--max-steps", "6",
                 "--output-dir", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].startswith(f"fine-tuning a head for object_recognition ({len(classes)} "
                               f"classes: {', '.join(classes[:2])}, ")
    assert f" on the slots of {ckpt} (model frozen), 6 steps on 12 clips of 6 train videos" \
        in lines[0]
    assert f"checkpoints in {out / 'checkpoints'}; TensorBoard: tensorboard --logdir {out}" \
        in lines[0]
    notes = [f"note: {unseen} of {len(labels['val'])} val/test videos have a class no train "
             "video has: they cannot be recognised"] if unseen else []
    assert lines[1:-1] == notes and RESULT_LINE.match(lines[-1]), lines
    # the only stderr lines are the step counter's (no Lightning warnings or banners)
    assert all(line.startswith("fine-tuning: ") for line in captured.err.splitlines()), captured.err

    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test_accuracy"] <= 1.0 and 0.0 < results["chance"] <= 1.0
    assert results["classes"] == classes and results["unfrozen"] == []
    counts = results["counts"]
    assert counts["train"] == {"clips": 12, "videos": 6}  # 6 videos x 2 clips of 2 frames
    assert counts["val"]["videos"] + counts["test"]["videos"] == 2
    assert results["best_checkpoint"] == RESULT_LINE.match(lines[-1]).group(3)
    saved = torch.load(results["best_checkpoint"], weights_only=False)
    assert saved[INFO_KEY]["task"] == "object_recognition"
    assert {key.split(".")[0] for key in saved["state_dict"]} == {"head"}  # the trained part only
    assert list(out.glob("events.out.tfevents.*"))

    # every tensor of the trained model is as in the checkpoint, after training and testing
    (module,) = loaded
    assert _changed(load_trained(ckpt)[1].model, module.model) == set()


def test_unfreeze_grouper_trains_slot_attention_and_nothing_else(trained, tmp_path,
                                                                  monkeypatch, capsys):
    from core.tools import load_trained

    ckpt, _ = trained
    loaded = _capture_model(monkeypatch)
    out = tmp_path / "ft"
    assert main(["finetune", "--checkpoint", ckpt, "--max-steps", "3", "--unfreeze", "grouper",
                 "--output-dir", str(out)]) == 0
    assert "model frozen except its grouper" in capsys.readouterr().out
    (module,) = loaded
    changed = _changed(load_trained(ckpt)[1].model, module.model)
    assert changed and {name.split(".")[0] for name in changed} == {"grouper"}
    results = json.loads((out / "results.json").read_text())
    assert results["unfrozen"] == ["grouper"]
    saved = torch.load(results["best_checkpoint"], weights_only=False)["state_dict"]
    assert {".".join(key.split(".")[:2]) for key in saved} == {"head.phi", "head.out",
                                                               "slots.grouper"}


def _dataset(trained, tmp_path, edit):
    """A copy of the generated dataset with ``edit(video_entry)`` applied to every video."""
    data = tmp_path / "data"
    shutil.copytree(trained[1], data)
    for split in ("train", "val"):
        index = data / "json" / f"{split}.json"
        content = json.loads(index.read_text())
        for video in content["videos"]:
            edit(video)
        index.write_text(json.dumps(content))
    return data


def _one_error_line(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slotsweep: error: "), captured.err
    assert "Traceback" not in captured.out + captured.err
    return lines[0]


def test_bad_input_is_one_line(trained, tmp_path, capsys):
    ckpt, _ = trained
    unlabelled = _dataset(trained, tmp_path / "a", lambda video: video.pop("label"))
    err = _one_error_line(capsys, ["finetune", "--checkpoint", ckpt, "--data-dir",
                                   str(unlabelled)])
    assert "8 of 8 videos have no 'label'" in err and "core/data/layout.py" in err
    one_class = _dataset(trained, tmp_path / "b", lambda video: video.update(label="red disk"))
    err = _one_error_line(capsys, ["finetune", "--checkpoint", ckpt, "--data-dir",
                                   str(one_class)])
    assert "every video has the label 'red disk'" in err and "at least two classes" in err
    err = _one_error_line(capsys, ["finetune", "--checkpoint", ckpt, "--task", "captioning"])
    assert "unknown task 'captioning'" in err and "object_recognition" in err
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(b"nope")
    assert "not a slotsweep checkpoint" in _one_error_line(capsys, ["finetune", "--checkpoint",
                                                                    str(bad)])


def test_val_split_is_halved_by_video_stratified_and_seeded():
    labels = ["a"] * 5 + ["b"] * 4 + ["c"]
    val, test = split_videos(labels, seed=0)
    assert sorted(val + test) == list(range(10)) and not set(val) & set(test)
    for label in ("a", "b"):
        on_val = sum(labels[i] == label for i in val)
        assert abs(on_val - sum(labels[i] == label for i in test)) <= 1
    assert split_videos(labels, seed=0) == (val, test)
    assert any(split_videos(labels, seed) != (val, test) for seed in range(1, 5))


@pytest.fixture
def one_thread():
    """Tiny matmuls on one thread: threads spinning against a busy machine's other work made
    150 steps take 45 s instead of 1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_head_is_permutation_invariant_and_learns_which_object_a_clip_holds(one_thread):
    """The class is carried by one slot, at a random position: a head that pools slots
    permutation-invariantly learns it (a head reading one slot position gets ~0.56)."""
    torch.manual_seed(0)
    n, t, k, d, classes = 192, 2, 4, 16, 3
    prototypes = torch.randn(classes, d) * 2
    labels = torch.randint(classes, (n,))
    slots = torch.randn(n, t, k, d)
    where = torch.randint(k, (n,))
    slots[torch.arange(n), :, where] += prototypes[labels][:, None]
    head = slot_head(d, classes)
    perm = torch.randperm(k)
    torch.testing.assert_close(head(slots[:, :, perm]), head(slots))
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3)
    train, held_out = slice(0, 128), slice(128, None)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(head(slots[train]), labels[train])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (head(slots[held_out]).argmax(-1) == labels[held_out]).float().mean()
    assert accuracy >= 0.9  # chance is about 1/3
