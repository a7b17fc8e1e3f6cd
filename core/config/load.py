"""Schema + YAML + ``key=value`` overrides -> a validated :class:`Config`.

Errors are :class:`ConfigError` with one line naming the key (and the nearest valid key for a
typo). The recipe's shorthand paths work: ``grouper.n_iters=5`` means ``model.grouper.n_iters=5``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.config.schema import (
    LOSS_SETTINGS,
    METRIC_SETTINGS,
    MODEL_KEYS,
    TOP_LEVEL_KEYS,
    Config,
    loss_settings,
)
from core.errors import ConfigError, one_line

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRECISIONS = {
    "32": "32-true", "32-true": "32-true", "64": "64-true", "64-true": "64-true",
    "16": "16-mixed", "16-mixed": "16-mixed", "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
    "16-true": "16-true", "bf16-true": "bf16-true",
}  # fmt: skip
_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$", re.DOTALL)


def shipped_configs() -> list[str]:
    """Names of the YAML files that ship with slotsweep (``core/configs``)."""
    return sorted(p.name for p in CONFIG_DIR.glob("*.yml"))


def find_config(path: str | Path) -> Path:
    """A config file by path, or by the name of a shipped one (``tiny``, ``tiny.yml``)."""
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    for name in (candidate.name, f"{candidate.name}.yml"):
        if (CONFIG_DIR / name).is_file() and len(candidate.parts) <= 3:
            return CONFIG_DIR / name
    raise ConfigError(
        f"config file {path} does not exist; shipped configs: {', '.join(shipped_configs())}"
    )


def leaf_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted leaf key of an OmegaConf node (interpolations left unresolved)."""
    if isinstance(node, DictConfig):
        for key in node:
            child = node._get_node(key)  # no interpolation resolution while walking
            path = f"{prefix}{key}"
            yield path
            yield from leaf_keys(child, path + ".")


def _valid_keys() -> list[str]:
    return list(leaf_keys(OmegaConf.structured(Config)))


def suggest_key(key: str) -> str:
    """`` (did you mean X?)`` for the valid key closest to ``key``, or an empty string."""
    keys = _valid_keys()
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        by_name = {k.rsplit(".", 1)[-1]: k for k in keys}
        match = difflib.get_close_matches(last, list(by_name), n=1, cutoff=0.7)
        close = [by_name[match[0]]] if match else []
    return f" (did you mean {close[0]}?)" if close else ""


def normalize_key(key: str) -> str:
    """Expand the shorthand: a key that starts with a model part lives under ``model.``."""
    head = key.split(".", 1)[0]
    if head not in TOP_LEVEL_KEYS and head in MODEL_KEYS:
        return f"model.{key}"
    return key


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or ""
    message = one_line(exc)
    if type(exc).__name__ in ("ConfigKeyError", "ConfigAttributeError", "KeyValidationError"):
        return ConfigError(f"unknown config key {key!r} in {source}{suggest_key(key)}")
    return ConfigError(f"config key {key or '?'} in {source}: {message}")


def parse_override(item: str) -> tuple[str, str]:
    """``"grouper.n_iters=5"`` -> ``("model.grouper.n_iters", "5")``."""
    match = _OVERRIDE.match(item.strip())
    if not match:
        raise ConfigError(f"override {item!r} is not key=value (e.g. globals.NUM_SLOTS=10)")
    return normalize_key(match.group(1)), match.group(2)


def compose(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults, then the YAML file, then each override, unresolved (interpolations kept)."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        file = find_config(path)
        try:
            loaded = OmegaConf.load(file)
        except Exception as exc:  # YAML syntax errors come in many types
            raise ConfigError(f"config file {file} is not valid YAML: {one_line(exc)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {file} must hold a mapping of keys, not a list")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(file)) from None
    for item in overrides:
        key, value = parse_override(item)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"override {item!r}") from None
    return cfg  # type: ignore[return-value]


def to_config(cfg: DictConfig) -> Config:
    """Resolve interpolations and check every value; returns the typed :class:`Config`."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "the config") from None
    assert isinstance(obj, Config)
    validate(obj)
    return obj


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML file (or the defaults when ``path`` is None) with overrides, validated."""
    return to_config(compose(path, overrides))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Impossible values fail here, at load time, not hours into a run."""
    g, m, t, o = cfg.globals, cfg.model, cfg.trainer, cfg.optimizer
    _require(g.NUM_SLOTS >= 1, f"globals.NUM_SLOTS must be >= 1, got {g.NUM_SLOTS}")
    _require(m.initializer.n_slots >= 1,  # set on its own, apart from globals.NUM_SLOTS
             f"model.initializer.n_slots must be >= 1, got {m.initializer.n_slots}")
    for key in ("SLOT_DIM", "FEAT_DIM", "BATCH_SIZE_PER_GPU", "NUM_GPUS"):
        _require(getattr(g, key) >= 1, f"globals.{key} must be >= 1, got {getattr(g, key)}")
    _require(m.grouper.n_iters >= 1, f"model.grouper.n_iters must be >= 1, got {m.grouper.n_iters}")
    _require(
        m.grouper.n_iters_first >= 1,
        f"model.grouper.n_iters_first must be >= 1, got {m.grouper.n_iters_first}",
    )
    _require(t.max_steps >= 1, f"trainer.max_steps must be >= 1, got {t.max_steps}")
    for key in ("val_check_interval", "checkpoint_every", "visualize_every", "log_every_n_steps"):
        value = getattr(t, key)
        _require(value >= 1, f"trainer.{key} must be >= 1 (steps), got {value}")
    _require(t.gradient_clip_val >= 0, "trainer.gradient_clip_val must be >= 0")
    _require(
        str(t.precision) in PRECISIONS,
        f"trainer.precision={t.precision!r} is not one of 32, 16, bf16, "
        + ", ".join(k for k in PRECISIONS if "-" in k),
    )
    _require(o.lr > 0, f"optimizer.lr must be > 0, got {o.lr}")
    _require(o.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(o.decay in ("exponential", "cosine", "none"),
             f"optimizer.decay={o.decay!r} is not one of exponential, cosine, none")
    _require(o.decay_steps >= 1, f"optimizer.decay_steps must be >= 1, got {o.decay_steps}")
    _require(o.decay == "none" or o.decay_steps > o.warmup_steps,
             f"optimizer.decay_steps={o.decay_steps} must be > optimizer.warmup_steps="
             f"{o.warmup_steps}: the decay runs from the end of warm-up to decay_steps")
    _require(m.predictor.attention_scale in ("published", "standard"),
             f"model.predictor.attention_scale={m.predictor.attention_scale!r} is not one of "
             "published, standard")
    for i, group in enumerate(o.param_groups):
        try:
            re.compile(group.regex)
        except re.error as exc:
            raise ConfigError(f"optimizer.param_groups[{i}].regex {group.regex!r}: {exc}") from None
    _require(m.mask_source in ("decoder", "attention"),
             f"model.mask_source={m.mask_source!r} is not one of decoder, attention")
    missing = sorted(set(m.losses) - set(m.loss_weights))
    extra = sorted(set(m.loss_weights) - set(m.losses))
    _require(not missing, f"model.loss_weights has no weight for loss {', '.join(missing)}: "
             "add model.loss_weights.<name>=<weight> (0 turns a loss off)")
    _require(not extra, f"model.loss_weights.{', '.join(extra)} names no loss in model.losses "
             f"(losses: {', '.join(sorted(m.losses))})")
    for name, weight in m.loss_weights.items():
        _require(weight >= 0, f"model.loss_weights.{name} must be >= 0, got {weight}")
    _require(any(w > 0 for w in m.loss_weights.values()), "every model.loss_weights is 0")
    for name, loss in m.losses.items():
        close = difflib.get_close_matches(loss.name, LOSS_SETTINGS, n=1)
        _require(loss.name in LOSS_SETTINGS, f"model.losses.{name}.name={loss.name!r} is not a "
                 "loss" + (f" (did you mean {close[0]}?)" if close else "")
                 + f"; valid: {', '.join(sorted(LOSS_SETTINGS))}")
        takes = LOSS_SETTINGS[loss.name]
        unknown = [k for k in loss_settings(loss) if k not in takes]
        _require(not unknown, f"model.losses.{name}.{', '.join(unknown)}: {loss.name} takes no "
                 f"{', '.join(unknown)} (its settings: {', '.join(takes) or 'none'})")
        if loss.temperature is not None:
            _require(loss.temperature > 0,
                     f"model.losses.{name}.temperature must be > 0, got {loss.temperature}")
        if loss.name == "SlotSlotContrastLoss" and m.loss_weights.get(name, 0) > 0:
            _require(
                cfg.dataset.ep_length >= 2,
                f"dataset.ep_length={cfg.dataset.ep_length} but {name} contrasts consecutive "
                f"frames: use ep_length >= 2 or set model.loss_weights.{name}=0",
            )
    for name, metric in cfg.val_metrics.items():
        _require(metric.name in METRIC_SETTINGS,
                 f"val_metrics.{name}.name={metric.name!r} is not one of "
                 f"{', '.join(METRIC_SETTINGS)}")
        if metric.name == "VideoIoU":
            _require((metric.matching or "overlap") in ("overlap", "hungarian"),
                     f"val_metrics.{name}.matching must be overlap or hungarian")
    cfg.dataset.validate()
    cfg.feature_cache.validate()


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what every run saves beside its checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))
    return path


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"model.grouper.n_iters": 3, ...}``: every leaf of the resolved config."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig):
            for key in node:
                walk(node[key], f"{prefix}{key}.")
        elif isinstance(node, ListConfig):
            out[prefix[:-1]] = OmegaConf.to_container(node)
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.structured(cfg), "")
    return out
