"""Config: schema defaults = the recipe's, YAML differences, overrides, shorthand, errors."""

from __future__ import annotations

import shlex

import pytest
import torch
from omegaconf import OmegaConf

from core.cli import parse_args, train_parser
from core.config import compose, flatten, load_config, parse_override, save_config
from core.config.load import CONFIG_DIR, shipped_configs
from core.errors import ConfigError
from core.models.build import build_losses, build_model


def test_defaults_are_the_recipes():
    cfg = load_config("integrated_saycam")
    g, m = cfg.globals, cfg.model
    assert (g.NUM_SLOTS, g.SLOT_DIM, g.SAYCAM_MODEL, g.FEAT_DIM) == (7, 128, "dino_say_vitb14", 768)
    assert (g.BATCH_SIZE_PER_GPU, g.NUM_GPUS) == (16, 1)
    assert (cfg.trainer.max_steps, cfg.trainer.gradient_clip_val) == (100_000, 0.05)
    assert cfg.trainer.checkpoint_every == cfg.trainer.val_check_interval == 2500
    assert cfg.trainer.visualize_every == 5000
    assert m.encoder.backbone.name == "TimmEncoder" and m.encoder.backbone.frozen
    assert m.encoder.backbone.model == "dino_say_vitb14"
    assert (m.grouper.name, m.grouper.inp_dim, m.grouper.slot_dim, m.grouper.n_iters) == (
        "SlotAttention", 128, 128, 3)
    assert (m.decoder.name, m.decoder.inp_dim, m.decoder.outp_dim) == ("MLPDecoder", 128, 768)
    assert list(m.decoder.hidden_dims) == [1024, 1024, 1024]
    assert dict(m.loss_weights) == {"loss_featrec": 1.0, "loss_ss": 0.5}
    assert m.losses["loss_ss"].temperature == 0.1
    assert (cfg.dataset.img_size, cfg.dataset.ep_length, cfg.dataset.batch_size) == (224, 8, 16)
    assert cfg.optimizer.lr == 4e-4
    assert cfg.val_metrics["ari"].name == "VideoARI"
    assert cfg.val_metrics["mbo"].matching == "overlap"


def test_globals_drive_every_component():
    cfg = load_config("integrated_saycam", ["globals.NUM_SLOTS=10", "globals.SLOT_DIM=64"])
    m = cfg.model
    assert m.initializer.n_slots == 10
    assert {m.initializer.dim, m.grouper.slot_dim, m.predictor.dim, m.decoder.inp_dim} == {64}
    assert m.encoder.output_transform.outp_dim == 64


RECIPE_OVERRIDES = {
    "dataset.batch_size=32": ("dataset.batch_size", 32),
    "globals.NUM_SLOTS=10": ("model.initializer.n_slots", 10),
    "optimizer.lr=0.0001": ("optimizer.lr", 1e-4),
    "trainer.max_steps=25000": ("trainer.max_steps", 25000),
    "trainer.gradient_clip_val=0.1": ("trainer.gradient_clip_val", 0.1),
    "encoder.backbone.frozen=true": ("model.encoder.backbone.frozen", True),
    "model.loss_weights.loss_ss=1.0": ("model.loss_weights.loss_ss", 1.0),
    "model.initializer.name=RandomInit": ("model.initializer.name", "RandomInit"),
    "grouper.n_iters=5": ("model.grouper.n_iters", 5),
    "losses.loss_ss.temperature=0.05": ("model.losses.loss_ss.temperature", 0.05),
    "dataset.ep_length=6": ("dataset.ep_length", 6),
    "globals.NUM_SLOTS=5": ("model.initializer.n_slots", 5),
    "trainer.precision=16": ("trainer.precision", "16"),
    "dataset.batch_size=8": ("dataset.batch_size", 8),
}


@pytest.mark.parametrize("override", sorted(RECIPE_OVERRIDES))
def test_every_override_of_the_recipe_applies(override):
    key, expected = RECIPE_OVERRIDES[override]
    cfg = OmegaConf.structured(load_config("integrated_saycam", [override]))
    assert OmegaConf.select(cfg, key) == expected


# The recipe's five `python train_integrated.py` command lines, as `slotsweep train` arguments.
RECIPE_COMMANDS = [
    "integrated_saycam.yml --data-dir /path/to/data --log-dir ./logs",
    "integrated_saycam.yml --data-dir /path/to/data --log-dir ./logs --use-optimizations "
    "dataset.batch_size=32 globals.NUM_SLOTS=10",
    "integrated_saycam.yml --data-dir /path/to/data --log-dir ./logs "
    "--continue ./logs/experiment_name/checkpoints/step=10000.ckpt",
    "integrated_saycam.yml --log-dir ./logs/stage1 trainer.max_steps=50000",
    "integrated_saycam.yml --log-dir ./logs/stage2 "
    "--continue ./logs/stage1/checkpoints/step=50000.ckpt optimizer.lr=0.0001 "
    "trainer.max_steps=25000",
]


def test_every_command_line_of_the_recipe_parses_and_loads():
    commands = [shlex.split(line) for line in RECIPE_COMMANDS]
    for argv in commands:
        args = parse_args(train_parser(), argv)
        assert args.config == "integrated_saycam.yml"
        cfg = load_config(args.config, args.overrides)  # shipped name found by file name
        assert cfg.experiment == "integrated_saycam"
    assert parse_args(train_parser(), commands[1]).use_optimizations
    assert parse_args(train_parser(), commands[1]).overrides == [
        "dataset.batch_size=32", "globals.NUM_SLOTS=10"]
    assert parse_args(train_parser(), commands[2]).continue_from.endswith("step=10000.ckpt")


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_every_shipped_yaml_loads_and_builds(name, tmp_path, monkeypatch):
    assert {"tiny.yml", "synthetic.yml", "integrated_saycam.yml", "shapes_cpu.yml"} <= set(
        shipped_configs())
    overrides = []
    if name == "integrated_saycam.yml":  # no weights here: the real architecture, random weights
        overrides = ["model.encoder.backbone.weights=random", "dataset.img_size=56"]
    cfg = load_config(CONFIG_DIR / name, overrides)
    model = build_model(cfg)
    losses = build_losses(cfg)
    assert set(losses) == set(cfg.model.loss_weights)
    size = cfg.dataset.img_size
    batch = {"video": torch.randn(2, 2, 3, size, size)}
    with torch.no_grad():
        out = model(batch)
    assert out["slots"].shape == (2, 2, cfg.globals.NUM_SLOTS, cfg.globals.SLOT_DIM)
    assert out["reconstruction"].shape[-1] == cfg.globals.FEAT_DIM


def test_the_loss_table_is_what_the_loss_classes_take():
    """core.config checks loss blocks without torch, from a table: it must match the classes."""
    from dataclasses import fields

    from core.config.schema import LOSS_SETTINGS, LossConfig
    from core.losses import LOSSES

    settings = {f.name for f in fields(LossConfig)} - {"name"}
    assert set(LOSS_SETTINGS) == set(LOSSES.names)
    for name, takes in LOSS_SETTINGS.items():
        assert set(takes) == settings & set(LOSSES.takes(name)), name


def test_metric_settings_table_matches_the_metric_classes():
    from dataclasses import fields

    from core.config.schema import METRIC_SETTINGS, MetricConfig
    from core.metrics import METRICS

    settings = {f.name for f in fields(MetricConfig)} - {"name"}
    assert set(METRIC_SETTINGS) == set(METRICS.names)
    for name, takes in METRIC_SETTINGS.items():
        assert set(takes) == settings & set(METRICS.takes(name)), name


def test_every_metric_setting_reaches_its_class():
    cfg = load_config("tiny", ["val_metrics.mbo.matching=hungarian",
                               "val_metrics.ari.ignore_background=false"])
    from core.training.module import SlotModule

    metrics = SlotModule(cfg).metrics
    assert (metrics["mbo"].matching, metrics["ari"].ignore_background) == ("hungarian", False)
    with pytest.raises(ConfigError, match=r"val_metrics\.ari\.name='VideoAri' is not one of "
                                          r"VideoARI, VideoIoU"):
        load_config("tiny", ["val_metrics.ari.name=VideoAri"])


def test_every_loss_setting_reaches_its_class():
    cfg = load_config("tiny", ["model.losses.loss_ss.batch_contrast=false",
                               "losses.loss_ss.temperature=0.25"])
    loss = build_losses(cfg)["loss_ss"]
    assert (loss.temperature, loss.batch_contrast) == (0.25, False)


def test_yaml_files_hold_only_differences():
    tiny = OmegaConf.load(CONFIG_DIR / "tiny.yml")
    assert "val_metrics" not in tiny and "losses" not in tiny.model


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["grouper.n_iter=5"], r"unknown config key 'model.grouper.n_iter' .*did you mean "
                               r"model.grouper.n_iters\?"),
        (["trainer.precison=16"], r"did you mean trainer.precision\?"),
        (["grouper.n_iters=abc"], r"model.grouper.n_iters .*'abc'"),
        (["globals.NUM_SLOTS=0"], r"globals.NUM_SLOTS must be >= 1, got 0"),
        (["model.initializer.n_slots=0"], r"^model.initializer.n_slots must be >= 1, got 0$"),
        # every setting of a loss block reaches its class, or fails naming the key
        (["model.losses.loss_featrec.temperature=0.5"],
         r"^model.losses.loss_featrec.temperature: MSELoss takes no temperature \(its settings: "
         r"none\)$"),
        (["model.losses.loss_ss.name=MSELos"],
         r"^model.losses.loss_ss.name='MSELos' is not a loss \(did you mean MSELoss\?\)"),
        (["model.losses.loss_ss.temprature=0.2"], r"did you mean model.losses.loss_ss.temperature"),
        (["dataset.ep_length=1"], r"dataset.ep_length=1 but loss_ss contrasts consecutive"),
        (["model.loss_weights.loss_sss=1"], r"loss_weights.loss_sss names no loss"),
        (["losses.loss_ss.temperature=0"], r"temperature must be > 0"),
        (["trainer.precision=8"], r"trainer.precision='8' is not one of"),
        (["novalue"], r"override 'novalue' is not key=value"),
        (["val_metrics.ari.name=VideoAR"], r"is not one of VideoARI, VideoIoU"),
    ],
)
def test_bad_values_fail_at_load_with_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config("integrated_saycam", overrides)
    assert "\n" not in str(info.value)


def test_ep_length_one_is_fine_without_the_contrast():
    cfg = load_config("tiny", ["dataset.ep_length=1", "model.loss_weights.loss_ss=0"])
    assert cfg.dataset.ep_length == 1


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text("model:\n  grouper:\n    n_iterz: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.grouper.n_iterz' in .*bad"):
        load_config(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"config file nope.yml does not exist; shipped configs"):
        load_config("nope.yml")


def test_shorthand_and_parse():
    assert parse_override("grouper.n_iters=5") == ("model.grouper.n_iters", "5")
    assert parse_override("globals.NUM_SLOTS=10") == ("globals.NUM_SLOTS", "10")
    assert parse_override("model.loss_weights.loss_ss=1.0")[0] == "model.loss_weights.loss_ss"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("tiny", ["globals.NUM_SLOTS=5"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert flatten(again) == flatten(cfg)
    assert flatten(cfg)["model.initializer.n_slots"] == 5
    assert "${" not in path.read_text()


def test_compose_keeps_interpolations_until_resolved():
    raw = compose("tiny", ["globals.NUM_SLOTS=4"])
    assert OmegaConf.select(raw, "model.initializer.n_slots") == 4
    assert OmegaConf.is_interpolation(raw.model.initializer, "n_slots")
