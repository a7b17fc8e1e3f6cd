"""`train()` and `slotsweep train` on the tiny config (CPU, seconds)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from core.cli import train_main
from core.config import load_config
from core.errors import ConfigError, NonFiniteLossError, SlotsweepError
from core.names import METRIC_ARI, METRIC_MBO
from core.train import train
from core.training.checkpoint import read_checkpoint, with_more_steps
from core.training.module import SlotModule, lr_lambda, param_groups
from core.training.trainer import best_checkpoint

FAST = ["dataset.batch_size=2", "trainer.checkpoint_every=2", "trainer.val_check_interval=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Generated data goes to one per-session cache, not the user's home."""
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


class Recorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.terms: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.terms.append({k: float(v) for k, v in trainer.callback_metrics.items()
                           if k.startswith("train/loss/")})


def test_tiny_run_writes_checkpoints_events_config_and_visuals(tmp_path):
    rec = Recorder()
    result = train(load_config("tiny"), [rec], log_dir=tmp_path, progress_bar=False)
    run = Path(result["run_dir"])
    assert run == tmp_path / "tiny"
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").glob("step=*.ckpt")) == [
        "step=1.ckpt", "step=2.ckpt"]
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert list(run.glob("events.out.tfevents.*"))
    assert (run / "visualizations" / "step=2.png").is_file()
    assert result["global_step"] == 2
    for key in ("train/loss", "train/loss/featrec", "train/loss/ss", "val/ari", "val/mbo"):
        assert key in result["metrics"], key
    assert -1.0 <= result["metrics"]["val/ari"] <= 1.0  # ARI of an untrained model: about 0
    assert set(rec.terms[-1]) == {"train/loss/featrec", "train/loss/ss"}
    ckpt = read_checkpoint(run / "checkpoints" / "step=2.ckpt")
    assert "NUM_SLOTS: 3" in ckpt["slotsweep_config"]
    # a second run of the same experiment does not overwrite the first
    again = train(load_config("tiny", ["trainer.max_steps=1"]), log_dir=tmp_path,
                  progress_bar=False)
    assert again["run_dir"] == str(tmp_path / "tiny-2")


def test_two_steps_then_continue_equals_four_straight(tmp_path):
    straight, first, second = Recorder(), Recorder(), Recorder()
    train(load_config("tiny", [*FAST, "trainer.max_steps=4"]), [straight],
          run_dir=tmp_path / "a", progress_bar=False)
    half = train(load_config("tiny", [*FAST, "trainer.max_steps=2"]), [first],
                 run_dir=tmp_path / "b", progress_bar=False)
    resumed = train(load_config("tiny", [*FAST, "trainer.max_steps=4"]), [second],
                    continue_from=half["checkpoints"][-1], progress_bar=False)
    assert resumed["mode"] == "resume" and resumed["run_dir"] == str(tmp_path / "b")
    assert len(straight.losses) == 4
    assert first.losses + second.losses == straight.losses  # bit-identical on CPU
    assert resumed["global_step"] == 4
    # resumed where it ended (an interrupted sweep's trial that had finished): nothing trains,
    # and the result still carries the last validation's metrics, from the checkpoint
    ended = train(load_config("tiny", [*FAST, "trainer.max_steps=4"]), [],
                  continue_from=resumed["checkpoints"][-1], progress_bar=False)
    assert ended["global_step"] == 4
    assert ended["metrics"]["val/ari"] == resumed["metrics"]["val/ari"]


def test_continue_with_other_settings_starts_a_new_stage(tmp_path):
    stage1 = train(load_config("tiny"), run_dir=tmp_path / "s1", progress_bar=False)
    cfg = load_config("tiny", ["optimizer.lr=0.0001", "trainer.max_steps=1"])
    stage2 = train(cfg, continue_from=stage1["checkpoints"][-1], log_dir=tmp_path / "stage2",
                   progress_bar=False)
    assert stage2["mode"] == "stage" and stage2["global_step"] == 1
    assert stage2["run_dir"] == str(tmp_path / "stage2" / "tiny")


def test_seed_two_stage_form_means_more_steps(tmp_path, capsys):
    first = train(load_config("tiny"), run_dir=tmp_path / "r", progress_bar=False)
    cfg = with_more_steps(load_config("tiny", ["trainer.max_steps=1"]), first["checkpoints"][-1])
    result = train(cfg, continue_from=first["checkpoints"][-1], progress_bar=False)
    assert result["global_step"] == 3
    assert "continuing from step 2 for 1 more steps" in capsys.readouterr().out


def test_cli_continue_counts_max_steps_on_from_the_checkpoint(tmp_path, capsys):
    first = train(load_config("tiny"), run_dir=tmp_path / "r", progress_bar=False)
    argv = ["tiny", "--continue", first["checkpoints"][-1], "trainer.max_steps=1"]
    assert train_main(argv) == 0
    out = capsys.readouterr().out
    assert "continuing from step 2 for 1 more steps" in out
    assert f"run: {tmp_path / 'r'} (3 steps)" in out


def test_train_counts_max_steps_as_a_total_on_resume(tmp_path, capsys):
    """A resumed run that had reached trainer.max_steps trains no further (a sweep's trial)."""
    first = train(load_config("tiny"), run_dir=tmp_path / "r", progress_bar=False)
    again = train(load_config("tiny"), continue_from=first["checkpoints"][-1], progress_bar=False)
    assert again["mode"] == "resume" and again["global_step"] == 2
    assert "more steps" not in capsys.readouterr().out


def test_a_best_checkpoint_among_the_callbacks_replaces_the_default_selection(tmp_path):
    run_dir = tmp_path / "sel"
    mine = best_checkpoint(run_dir, METRIC_MBO, "min", None)
    result = train(load_config("tiny"), [mine], run_dir=run_dir, progress_bar=False)
    assert result["best_checkpoint"] == str(run_dir / "checkpoints" / "best.ckpt")
    assert mine.best is not None and result["best_score"] == mine.best["score"]
    best = json.loads((run_dir / "best.json").read_text())
    assert (best["metric"], best["mode"], best["tie_break"]) == (METRIC_MBO, "min", None)
    assert best["score"] == result["best_metrics"][METRIC_MBO]
    default = train(load_config("tiny"), run_dir=tmp_path / "default", progress_bar=False)
    best = json.loads((tmp_path / "default" / "best.json").read_text())
    assert (best["metric"], best["mode"], best["tie_break"]) == (METRIC_ARI, "max", METRIC_MBO)
    assert default["best_score"] == best["score"]


class PoisonAt(pl.Callback):
    """Turns a decoder weight into NaN before the given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.decoder.layers[0].weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = load_config("tiny", ["trainer.max_steps=5", "trainer.checkpoint_every=1"])
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, [PoisonAt(3)], run_dir=tmp_path / "nan", progress_bar=False)
    message = str(info.value)
    assert "at step 3" in message and "loss_featrec" in message
    assert "optimizer.lr=0.0001" in message and "gradient_clip_val" in message
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("step=*.ckpt"))
    assert ckpts == ["step=1.ckpt", "step=2.ckpt", "step=3.ckpt"]  # 3 = after step 3 of 1..3
    state = read_checkpoint(tmp_path / "nan" / "checkpoints" / "step=3.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_overfitting_one_batch_halves_the_loss(tmp_path):
    from core.training.module import SlotModule

    cfg = load_config("tiny", ["globals.SLOT_DIM=32", "optimizer.warmup_steps=0"])
    torch.manual_seed(0)
    module = SlotModule(cfg)
    batch = {"video": torch.randn(4, 2, 3, 56, 56)}
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(200):
        loss, _ = module._losses(module.model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_frozen_backbone_gets_no_gradient_and_every_trainable_parameter_does():
    from core.training.module import SlotModule

    module = SlotModule(load_config("tiny"))
    out = module.model({"video": torch.randn(2, 2, 3, 56, 56)})
    loss, _ = module._losses(out)
    loss.backward()
    for name, param in module.model.named_parameters():
        if name.startswith("encoder."):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_fine_tune_strategy_trains_the_backbone_with_its_own_lr():
    from core.training.module import SlotModule

    cfg = load_config("tiny", ["encoder.backbone.frozen=false", "model.encoder.learning_rate=1e-5",
                               "optimizer.param_groups=[{regex: 'decoder.*', lr: 0.0002}]"])
    module = SlotModule(cfg)
    groups = {g["name"]: g for g in param_groups(module.model, cfg)}
    assert groups[r"encoder\."]["lr"] == 1e-5 and groups["decoder.*"]["lr"] == 2e-4
    assert groups["default"]["lr"] == cfg.optimizer.lr
    n_encoder = sum(1 for n, p in module.model.named_parameters() if n.startswith("encoder."))
    assert len(groups[r"encoder\."]["params"]) == n_encoder
    assert module.model.encoder.vit.training is False or module.model.encoder.frozen is False


def test_learning_rate_schedule():
    """Named steps of the published schedule: tests/core/test_parity.py; here the Lightning wiring:
    the optimizer's lr follows lr_lambda step by step."""
    cfg = load_config("tiny", ["optimizer.warmup_steps=4", "optimizer.decay_steps=12"])
    module = SlotModule(cfg)
    conf = module.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(14):
        seen.append(optimizer.param_groups[-1]["lr"])
        optimizer.step()
        scheduler.step()
    want = [cfg.optimizer.lr * lr_lambda(s, 4, "exponential", 0.5, 12) for s in range(14)]
    assert seen == pytest.approx(want)
    assert seen[0] == 0.0 and seen[4] == pytest.approx(cfg.optimizer.lr)
    assert seen[12] == pytest.approx(0.5 * cfg.optimizer.lr)


# ---------------------------------------------------------------- the command line


def test_cli_train_tiny(tmp_path, capsys):
    assert train_main(["tiny", "--log-dir", str(tmp_path), "globals.NUM_SLOTS=4"]) == 0
    out = capsys.readouterr().out
    assert f"run: {tmp_path / 'tiny'} (2 steps)" in out and "val/ari=" in out


def _fail(argv, capsys) -> str:
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slotsweep: error: ") and "\n" not in err, err
    return err


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    log = ["--log-dir", str(tmp_path)]
    assert "did you mean model.grouper.n_iters" in _fail(["tiny", "grouper.n_iter=2"], capsys)
    err = _fail(["tiny", "model.initializer.name=FixedInit", *log], capsys)
    assert "unknown model.initializer.name 'FixedInit'" in err and "RandomInit" in err
    err = _fail(["tiny", "--continue", str(tmp_path / "missing.ckpt"), *log], capsys)
    assert "missing.ckpt does not exist" in err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00not a checkpoint")
    assert "is corrupt" in _fail(["tiny", "--continue", str(corrupt), *log], capsys)
    result = train(load_config("tiny"), run_dir=tmp_path / "k3", progress_bar=False)
    err = _fail(["tiny", "globals.NUM_SLOTS=5", "--continue", result["checkpoints"][0], *log],
                capsys)
    assert "does not fit this model" in err and "NUM_SLOTS" in err
    cut = tmp_path / "cut.ckpt"  # a real checkpoint cut short by a crash
    data = Path(result["checkpoints"][0]).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    assert "cut.ckpt is corrupt" in _fail(["tiny", "--continue", str(cut), *log], capsys)
    (tmp_path / "empty" / "json").mkdir(parents=True)
    (tmp_path / "empty" / "frames").mkdir()
    (tmp_path / "empty" / "json" / "train.json").write_text('{"videos": []}')
    err = _fail(["tiny", "--data-dir", str(tmp_path / "empty"), "dataset.synthetic=null", *log],
                capsys)
    assert "no videos in the train split" in err


def test_cli_train_unknown_data_dir(tmp_path, capsys):
    err = _fail(["integrated_saycam", "--data-dir", str(tmp_path / "nowhere"),
                 "model.encoder.backbone.weights=random"], capsys)
    assert "nowhere/json does not exist" in err


def test_missing_backbone_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    root = tmp_path / "data"
    from core.data.synthetic import SyntheticSpec, write_synthetic_dataset

    write_synthetic_dataset(root, 4, SyntheticSpec(n_frames=8, size=32), seed=0)
    err = _fail(["integrated_saycam", "--data-dir", str(root), "dataset.img_size=28"], capsys)
    assert "no local checkpoint for dino_say_vitb14" in err


def test_python_dash_m_core_train_needs_no_orchestrator(tmp_path):
    code = (
        "import sys, core.cli as c; rc = c.train_main(['tiny', '--log-dir', sys.argv[1]]); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'orchestrator')]; "
        "print(bad); sys.exit(rc or bool(bad))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_precision_16_on_cpu_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(ConfigError, match="needs a GPU"):
        train(load_config("tiny", ["trainer.precision=16"]), run_dir=tmp_path, progress_bar=False)


def test_bf16_and_gradient_checkpointing_run_on_cpu(tmp_path):
    cfg = load_config("tiny", ["trainer.precision=bf16", "trainer.gradient_checkpointing=true",
                               "trainer.max_steps=1"])
    result = train(cfg, run_dir=tmp_path / "bf16", progress_bar=False)
    assert result["global_step"] == 1


def test_ddp_over_two_cpu_processes(tmp_path):
    """trainer.devices=2 on a CPU: Lightning DDP with gloo, rank 0 alone writes and prints."""
    env = {**__import__("os").environ, "SLOTSWEEP_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "core.train", "tiny", "--log-dir", str(tmp_path),
         "trainer.devices=2", "trainer.accelerator=cpu", "dataset.batch_size=2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1 and "(2 steps)" in proc.stdout
    assert (tmp_path / "tiny" / "checkpoints" / "step=2.ckpt").is_file()


def test_slot_grid_rows():
    from core.training.callbacks import slot_grid

    video, masks = torch.randn(3, 3, 28, 28), torch.rand(3, 4, 2, 2).softmax(dim=1)
    features, recon = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    plain = slot_grid(video, masks, (0.5,) * 3, (0.2,) * 3)
    assert plain.shape == (3, 6 * 30 + 2, 3 * 30 + 2)  # frames, 4 slots, overlay
    full = slot_grid(video, masks, (0.5,) * 3, (0.2,) * 3, features, recon)
    assert full.shape == (3, 8 * 30 + 2, 3 * 30 + 2)  # + target features, reconstruction
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0


def test_frozen_backbone_from_a_file_is_left_out_of_checkpoints(tmp_path):
    import timm
    from dino_format import FAKE, write_dino_checkpoint  # registers FAKE with timm

    torch.manual_seed(7)
    vit = timm.create_model(FAKE)
    weights = write_dino_checkpoint(tmp_path / f"{FAKE}.pth", vit)
    overrides = [f"globals.SAYCAM_MODEL={FAKE}", "model.encoder.backbone.weights=pretrained",
                 f"model.encoder.backbone.checkpoint={weights}", "model.encoder.backbone.vit={}"]
    first = train(load_config("tiny", overrides), run_dir=tmp_path / "a", progress_bar=False)
    ckpt = read_checkpoint(first["checkpoints"][-1])
    assert not any(k.startswith("model.encoder.") for k in ckpt["state_dict"])
    assert ckpt["slotsweep_encoder"]["model"] == FAKE
    more = train(load_config("tiny", [*overrides, "trainer.max_steps=3"]),
                 continue_from=first["checkpoints"][-1], progress_bar=False)
    assert more["global_step"] == 3 and more["mode"] == "resume"
    (tmp_path / "other").mkdir()
    torch.manual_seed(8)  # other weights (train() leaves the global RNG in a fixed state)
    other = write_dino_checkpoint(tmp_path / "other" / f"{FAKE}.pth",
                                  timm.create_model(FAKE))
    swapped = [*overrides[:2], f"model.encoder.backbone.checkpoint={other}", overrides[3]]
    same_file = r"point model\.encoder\.backbone\.checkpoint at the same"
    with pytest.raises(SlotsweepError, match=same_file):
        train(load_config("tiny", [*swapped, "trainer.max_steps=4"]),
              continue_from=first["checkpoints"][-1], progress_bar=False)


def test_a_full_disk_mid_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing step=4.ckpt (injected at the write call): the run stops with one
    line naming the checkpoint to continue from, step=2.ckpt is whole, no partial file is left,
    and --continue finishes once there is space."""
    import errno

    from pytorch_lightning.plugins import TorchCheckpointIO

    write = TorchCheckpointIO.save_checkpoint

    def full_at_step_4(self, checkpoint, path, storage_options=None):
        if checkpoint.get("global_step") == 4:
            with open(path, "wb") as f:  # a partial write, then the disk is full
                f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, checkpoint, path, storage_options)

    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", full_at_step_4)
    argv = ["tiny", *FAST, "trainer.max_steps=6", "--log-dir", str(tmp_path)]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpts = tmp_path / "tiny" / "checkpoints"
    assert err.startswith("slotsweep: error: could not write checkpoint ") and "step=4.ckpt" in err
    assert "No space left on device" in err and f"continue from {ckpts / 'step=2.ckpt'}" in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.ckpt", "step=2.ckpt"]
    assert read_checkpoint(ckpts / "step=2.ckpt")["global_step"] == 2
    monkeypatch.setattr(TorchCheckpointIO, "save_checkpoint", write)  # space again
    assert train_main(["tiny", *FAST, "trainer.max_steps=6", "--continue",
                       str(ckpts / "step=2.ckpt")]) == 0
    assert (ckpts / "step=6.ckpt").is_file()


def _train_to_a_checkpoint(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    """`python -m core.train tiny` for 2,000 steps in a subprocess, returned once it has written
    its first step checkpoint (with the checkpoints' folder)."""
    cmd = [sys.executable, "-m", "core.train", "tiny", "trainer.max_steps=2000",
           "trainer.checkpoint_every=2", *overrides, "--log-dir", str(tmp_path)]
    env = {**os.environ, "SLOTSWEEP_CACHE": os.environ["SLOTSWEEP_CACHE"]}
    # SIGINT back to its default in the child: a shell's background job (CI's, often) starts
    # with it ignored, and Python then installs no KeyboardInterrupt handler
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[2],
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts = tmp_path / "tiny" / "checkpoints"
    deadline = time.monotonic() + 240
    while not list(ckpts.glob("step=*.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    return proc, ckpts


def test_a_killed_data_loading_worker_is_one_line_with_the_continue_command(tmp_path):
    """SIGTERM to a DataLoader worker (an OOM killer or a cluster would send it): the run stops
    with one line naming the last checkpoint and the --continue command, not a traceback."""
    from processes import alive, descendants

    proc, ckpts = _train_to_a_checkpoint(tmp_path, "dataset.num_workers=1")
    workers = alive(descendants(proc.pid))
    assert workers, "no DataLoader worker process"
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err[-3000:]
    assert line.startswith("slotsweep: training stopped: a data-loading worker died (DataLoader "
                           "worker (pid"), line
    # PyTorch says one or the other, depending on when the main process notices
    assert "is killed by signal: Terminated" in line or "exited unexpectedly" in line, line
    assert f"continue with: slotsweep train tiny --continue {ckpts}/step=" in line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_on_train_is_one_line_with_the_continue_command(tmp_path, sig):
    """Training stops within seconds, exit 130, one line naming the last checkpoint (kept whole)
    and the --continue command; no process is left."""
    from processes import alive, descendants

    proc, _ = _train_to_a_checkpoint(tmp_path)
    children = descendants(proc.pid)
    start = time.monotonic()
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    assert time.monotonic() - start < 30
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    how = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert line.startswith(f"slotsweep: training stopped: training interrupted by {how} at step ")
    last = line.split("continue with: slotsweep train tiny --continue ")[1]
    assert read_checkpoint(last)["global_step"] >= 2
    assert not alive(children)


def test_progress_is_a_live_bar_on_a_terminal_and_plain_lines_elsewhere(monkeypatch):
    """stderr a terminal: Lightning's bar, no lines; not a terminal (a file, CI): no bar, lines
    saying the step of max_steps, speed, ETA, loss and the last validation."""
    import io
    from types import SimpleNamespace

    from core.training.progress import ProgressLines, StepBar
    from core.training.trainer import build_trainer

    cfg = load_config("tiny", ["trainer.max_steps=4"])
    data = SimpleNamespace(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda tty=tty: tty)
        trainer, _ = build_trainer(cfg, Path("run"), data, [], precision="32")
        lines = [c for c in trainer.callbacks if isinstance(c, ProgressLines)]
        assert isinstance(trainer.progress_bar_callback, StepBar) == tty and bool(lines) != tty
    trainer, _ = build_trainer(cfg, Path("run"), data, [], precision="32", progress_bar=False)
    assert trainer.progress_bar_callback is None  # a sweep's trial: neither
    assert not [c for c in trainer.callbacks if isinstance(c, ProgressLines)]

    out = io.StringIO()
    lines = ProgressLines(Path("run/checkpoints"), every_s=30.0, stream=out)
    fake = SimpleNamespace(global_step=100, max_steps=600, sanity_checking=False,
                           callback_metrics={"train/loss": 0.83125, "val/ari": 0.2134,
                                             "val/mbo": 0.18})
    lines.on_train_start(fake, None)
    assert "training to step 600" in out.getvalue() and "run/checkpoints" in out.getvalue()
    lines._t0, lines._last, lines._s0 = lines._t0 - 40.0, lines._last - 40.0, 0  # 100 in 40 s
    lines.on_validation_end(fake, None)
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("step 100/600 (17%) · 2.5 steps/s · ETA 3m20s"), last
    assert "train/loss 0.8313" in last and "val/ari 0.2134  val/mbo 0.18 (step 100)" in last


def test_the_live_bar_counts_the_whole_run_with_loss_and_validation(tmp_path, capsys):
    """On a terminal: one bar over all max_steps (not one epoch), steps/s, ETA, train/loss and
    the last val/ari and val/mbo, under a line naming the checkpoints' folder."""
    cfg = load_config("tiny", [*FAST, "trainer.max_steps=6", "trainer.val_check_interval=3"])
    train(cfg, run_dir=tmp_path / "run", progress_bar=True)
    out = capsys.readouterr().out.replace("\r", "\n")
    assert f"training to step 6 (from 0); checkpoints in {tmp_path / 'run' / 'checkpoints'}" in out
    last = [ln for ln in out.splitlines() if ln.startswith("step:") and "6/6" in ln][-1]
    assert "steps/s" in last and "train/loss=" in last and "val/ari=" in last, last
