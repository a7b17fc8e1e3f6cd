"""The sweep file: a typed :class:`SweepSpec`, validated completely before anything starts.

``load_sweep(path, overrides)`` builds the spec as core builds a run's config:
``OmegaConf.structured(SweepSpec)`` merged with the YAML file, then with the command-line
``key=value`` items (a sweep field such as ``trials=8`` sets it; ``search.<key>=...`` sets one
dimension; any other key, e.g. ``trainer.max_steps=4``, is a config override for every trial).
:func:`orchestrator.spec_check.validate` then checks it by composing and loading configs only: no
model, data, weights or Ray. Every error is one :class:`ConfigError` line naming the culprit and
the fix. The Ray Tune pieces are in :mod:`orchestrator.search`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

from core.config.load import leaf_keys, normalize_key, parse_override, suggest_key
from core.config.schema import MODEL_KEYS, TOP_LEVEL_KEYS
from core.errors import ConfigError, one_line
from core.hashing import json_digest
from core.names import METRIC_ARI
from core.paths import PathError, given_dir, writable_dir
from orchestrator import PROJECT_DIR
from orchestrator.spec_check import node_at, suggest, validate

SWEEP_DIR = PROJECT_DIR / "sweeps"
DEFAULT_STORAGE = Path("runs") / "sweeps"


@dataclass
class AlgorithmSpec:
    name: str = "random"  # random | grid | optuna (TPE)
    seed: int = 0  # the searcher's seed


@dataclass
class SchedulerSpec:
    name: str = "none"  # none | asha
    grace_period: int | None = None  # training steps; None: trainer.val_check_interval
    reduction_factor: float = 3.0


@dataclass
class ResourcesSpec:
    """What one trial gets in total; ``workers`` DDP processes share it evenly."""

    cpus_per_trial: float = 1
    gpus_per_trial: float = 0  # < 1 packs trials on one GPU (0.25: four); > 1 must be whole
    workers: int | None = None  # None: max(1, gpus_per_trial) GPUs >= 1, else 1


@dataclass
class SelectSpec:
    metric: str = METRIC_ARI
    mode: str = "max"
    tie_break: str | None = None


@dataclass
class MlflowSpec:
    experiment: str = "slotsweep"
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI or the embedded server


@dataclass
class SweepSpec:
    """A whole sweep (see sweeps/*.yaml). :func:`validate` fills in the derived values."""

    name: str
    base: str
    overrides: list[str] = field(default_factory=list)
    data_dir: str | None = None
    # dotted config key -> {distribution: args}, free-form in the file; validate() makes each a
    # spec_check.Distribution under its full key (shorthand ``grouper.x`` -> ``model.grouper.x``)
    search: dict[str, Any] = field(default_factory=dict)
    algorithm: AlgorithmSpec = field(default_factory=AlgorithmSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    trials: int | None = None  # random/optuna: required; grid: None or the grid size
    concurrency: int = 1
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    select: SelectSpec = field(default_factory=SelectSpec)
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    storage: str | None = None  # None: ./runs/sweeps; a relative path is made absolute
    max_failures: int = 0  # retries of a failing trial, from its last checkpoint
    seed: int = 0  # trial i trains with config seed = seed + i


SWEEP_FIELDS = tuple(f.name for f in dataclasses.fields(SweepSpec))
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_KINDS = {IntegerNode: "an int", FloatNode: "a number", StringNode: "a string",
          BooleanNode: "true or false", ListConfig: "a list of strings", DictConfig: "a mapping"}


def _field_keys() -> list[str]:
    return list(leaf_keys(OmegaConf.structured(SweepSpec)))


def _explain(exc: OmegaConfBaseException, key: str) -> ConfigError:
    """OmegaConf's error on sweep field ``key`` as one line that names the field and the fix."""
    key = exc.full_key or key
    if isinstance(exc, (ConfigAttributeError, ConfigKeyError)):
        return ConfigError(f"unknown sweep field {key!r}{suggest(key, _field_keys())}")
    if isinstance(exc, MissingMandatoryValue):
        return ConfigError(f"the sweep has no {key}: add {key}: ... to the file")
    node = node_at(OmegaConf.structured(SweepSpec), key)
    if isinstance(exc, ValidationError) and node is not None:
        kind = _KINDS.get(type(node), "another type")
        return ConfigError(f"sweep field {key} must be {kind}, got {exc.value!r}")
    return ConfigError(f"sweep field {key}: {one_line(exc)}")


def _set(cfg: DictConfig, key: str, value: Any, text: str | None = None) -> None:
    """Set sweep field ``key`` (dotted) to ``value``: checked against the schema; a mapping merges
    into the field's defaults (``search`` is replaced); ``text`` is kept as is for a string."""
    node = node_at(cfg, key)
    if node is None:
        raise ConfigError(f"unknown sweep field {key!r}{suggest(key, _field_keys())}")
    if isinstance(node, DictConfig):
        if value is None:
            return  # null: the defaults
        if not isinstance(value, (dict, DictConfig)):
            raise ConfigError(f"sweep field {key} must be a mapping, got {value!r}")
    if isinstance(node, StringNode) and value is not None and text is not None:
        value = text
    try:
        OmegaConf.update(cfg, key, value, merge=key != "search")
    except OmegaConfBaseException as exc:
        raise _explain(exc, key) from None


def _value(item: str, text: str) -> Any:
    """The value of a command-line item, parsed as YAML the way OmegaConf's dotlists are."""
    try:
        parsed = OmegaConf.from_dotlist([f"v={text}"])
    except yaml.YAMLError as exc:
        raise ConfigError(f"{item!r}: {' '.join(str(exc).split())}") from None
    return OmegaConf.to_container(parsed)["v"]  # type: ignore[index]


def _apply_item(cfg: DictConfig, item: str) -> None:
    """One command-line ``key=value``: a sweep field, ``search.<key>``, or a config override."""
    key, text = parse_override(item)
    head, _, rest = key.partition(".")
    if head == "search" and rest:
        for old in [k for k in cfg.search if normalize_key(str(k)) == normalize_key(rest)]:
            del cfg.search[old]
        cfg.search[rest] = _value(item, text)
    elif head in SWEEP_FIELDS:  # `seed` is the sweep's (a trial's config seed is seed + i)
        _set(cfg, key, _value(item, text), text)
    elif head in TOP_LEVEL_KEYS or head in MODEL_KEYS:
        cfg.overrides.append(item.strip())
    else:
        hint = suggest(key, _field_keys()) or suggest_key(key)
        raise ConfigError(f"{item!r} names neither a sweep field nor a config key{hint}")


def find_sweep(path: str | Path) -> Path:
    """A sweep file by path, or by the name of a shipped one (``quickstart``, ``shapes.yaml``)."""
    file = Path(path).expanduser()
    if file.is_file():
        return file
    for name in (file.name, f"{file.name}.yaml"):
        if len(file.parts) == 1 and (SWEEP_DIR / name).is_file():
            return SWEEP_DIR / name
    shipped = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
    raise ConfigError(f"sweep file {path} does not exist; shipped sweeps: {shipped or 'none'}")


def _read(file: Path) -> dict[str, Any]:
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(file))
    except Exception as exc:  # YAML syntax errors come in many types
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"sweep file {file} is not valid YAML: {message}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"sweep file {file} must hold a mapping (name: ..., base: ..., ...)")
    return loaded  # type: ignore[return-value]


def _compose(loaded: dict[str, Any], overrides: Sequence[str]) -> SweepSpec:
    """Schema defaults, then the file's fields, then each ``key=value`` item; not validated."""
    cfg = OmegaConf.structured(SweepSpec)
    for key, value in loaded.items():
        _set(cfg, str(key), value)
    for item in overrides:
        _apply_item(cfg, item)
    # free-form: a ${...} in them is the run config's, kept unresolved (to_object resolves)
    free = {"overrides": OmegaConf.to_container(cfg.overrides),
            "search": OmegaConf.to_container(cfg.search)}
    cfg.overrides, cfg.search = [], {}
    try:
        spec = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise _explain(exc, "?") from None
    assert isinstance(spec, SweepSpec)
    return dataclasses.replace(spec, **free)


def _absolute(path: str) -> str:
    return path if _URI.match(path) else str(Path(path).expanduser().resolve())


def _absolute_paths(spec: SweepSpec) -> SweepSpec:
    """``storage`` (default ./runs/sweeps), ``data_dir`` and a file ``mlflow.tracking_uri``
    made absolute: a trial runs with its own working directory."""
    spec.storage = _absolute(spec.storage or str(DEFAULT_STORAGE))
    spec.data_dir = None if spec.data_dir is None else _absolute(spec.data_dir)
    uri = spec.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    spec.mlflow.tracking_uri = uri if not uri or ":" in uri else _absolute(uri)
    try:
        if not _URI.match(spec.storage):
            writable_dir(spec.storage, "storage")
        if spec.data_dir is not None:
            given_dir(spec.data_dir, "data_dir")
        if uri and uri.startswith("sqlite:///"):
            writable_dir(Path(uri[len("sqlite:///") :]).parent, "mlflow.tracking_uri's folder")
        elif uri and ":" not in uri:
            writable_dir(spec.mlflow.tracking_uri, "mlflow.tracking_uri")
    except PathError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep file (or a shipped one by name), apply ``key=value`` items, validate."""
    file = find_sweep(path)
    loaded = _read(file)
    try:
        return _absolute_paths(validate(_compose(loaded, overrides)))
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


def sweep_key(spec: SweepSpec) -> str:
    """A short stable id of this sweep (its name and storage) that survives restarts."""
    return json_digest([spec.name, spec.storage], 12)


def to_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec as the plain mapping of a sweep file (``load_sweep`` reads it back)."""
    data = dataclasses.asdict(spec)
    data["search"] = {k: {d.kind: d.args} for k, d in spec.search.items()}
    return data


def to_yaml(spec: SweepSpec) -> str:
    """The spec as YAML, to record beside the sweep's trials."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False)
