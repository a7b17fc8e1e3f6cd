"""The sweep file: a typed :class:`SweepSpec`, validated completely before anything starts.

``load_sweep(path, overrides)`` reads the YAML, applies command-line ``key=value`` items (a sweep
field such as ``trials=8`` sets it; any other key, e.g. ``trainer.max_steps=4``, is a config
override for every trial) and calls :func:`validate`, which only composes and loads configs: it
never builds a model, reads data or weights, or imports Ray. Every error is one
:class:`ConfigError` line naming the culprit and the fix. The Ray pieces (:func:`param_space`,
:func:`make_search_alg`, :func:`make_scheduler`) import ``ray.tune`` when called.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.config import Config, compose, find_config, load_config, to_config
from core.config.load import CONFIG_DIR, normalize_key, suggest_key
from core.config.schema import MODEL_KEYS, TOP_LEVEL_KEYS
from core.errors import ConfigError
from core.hashing import json_digest
from core.names import METRIC_ARI, TRAIN_LOSS, VAL_LOSS

SWEEP_DIR = Path(__file__).resolve().parents[1] / "sweeps"
DEFAULT_STORAGE = Path("runs") / "sweeps"
ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("none", "asha")
RANGES = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3, "qloguniform": 3}
DISTRIBUTIONS = ("choice", "grid", *RANGES)
FLOAT_RANGES = ("uniform", "loguniform", "quniform", "qloguniform")
# The names core.training.module logs (mirrored: importing it costs torch; a test pins them).
STEP = "step"  # reported by every trial; ASHA's time_attr (training steps)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ITEM = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$", re.DOTALL)


class _Loader(yaml.SafeLoader):
    """YAML with 1.2 floats: ``1e-4`` is a number (PyYAML's 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF))$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


@dataclass
class Distribution:
    """One search dimension: ``{kind: args}`` in the file, e.g. ``{loguniform: [0.03, 0.3]}``."""

    kind: str
    args: Any


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
    search: dict[str, Distribution] = field(default_factory=dict)
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


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _field_paths(cls: type = SweepSpec, prefix: str = "") -> list[str]:
    paths = []
    for name, tp in get_type_hints(cls).items():
        paths.append(prefix + name)
        if dataclasses.is_dataclass(tp) and tp is not Distribution:
            paths += _field_paths(tp, f"{prefix}{name}.")
    return paths


def _field_type(path: str) -> Any:
    """The declared type of a dotted sweep field, or None if there is no such field."""
    tp: Any = SweepSpec
    for part in path.split("."):
        hints = get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _coerce(value: Any, tp: Any, path: str) -> Any:
    if get_origin(tp) is Union or isinstance(tp, types.UnionType):
        if value is None:
            return None
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp == dict[str, Distribution]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"search must map config keys to distributions, got {value!r}")
        return {normalize_key(str(k)): _distribution(str(k), v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, path + ".")
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        list[str]: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[tp]
    if not ok:
        kind = {int: "an int", float: "a number", str: "a string", list[str]: "a list of strings"}
        raise ConfigError(f"sweep field {path} must be {kind[tp]}, got {value!r}")
    return float(value) if tp is float else value


def _build(cls: Any, data: Any, prefix: str = "") -> Any:
    """A dataclass from a mapping; unknown keys fail with the nearest sweep field."""
    if not isinstance(data, dict):
        raise ConfigError(f"sweep field {prefix[:-1] or '(file)'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            path = f"{prefix}{key}"
            raise ConfigError(f"unknown sweep field {path!r}{_suggest(path, _field_paths())}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"the sweep has no {prefix}{f.name}: add {f.name}: ... to the file")
    return cls(**kwargs)


def _distribution(key: str, value: Any) -> Distribution:
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"search {key}: give exactly one distribution as {{name: args}} "
                          f"({', '.join(DISTRIBUTIONS)}), got {value!r}")
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        hint = _suggest(str(kind), DISTRIBUTIONS)
        raise ConfigError(f"search {key}: unknown distribution {kind!r}{hint}; "
                          f"known: {', '.join(DISTRIBUTIONS)}")
    return Distribution(kind, args)


def _yaml(text: str, item: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{item!r}: {' '.join(str(exc).split())}") from None


def _apply_item(raw: dict, item: str) -> None:
    """One command-line ``key=value``: a sweep field, ``search.<key>``, or a config override."""
    match = _ITEM.match(item.strip())
    if not match:
        raise ConfigError(f"{item!r} is not key=value (e.g. trials=8, trainer.max_steps=4)")
    key, text = match.groups()
    head, _, rest = key.partition(".")
    if head == "search" and rest:
        search = raw["search"] = dict(raw.get("search") or {})
        for old in [k for k in search if normalize_key(str(k)) == normalize_key(rest)]:
            del search[old]
        search[rest] = _yaml(text, item)
    elif head in SWEEP_FIELDS:  # `seed` is the sweep's (a trial's config seed is seed + i)
        value = _yaml(text, item)
        if _field_type(key) in (str, str | None) and value is not None:
            value = text
        node = raw
        for part in key.split(".")[:-1]:
            node[part] = dict(node[part]) if isinstance(node.get(part), dict) else {}
            node = node[part]
        node[key.split(".")[-1]] = value
    elif head in TOP_LEVEL_KEYS or head in MODEL_KEYS:
        raw["overrides"] = [*(raw.get("overrides") or []), item.strip()]
    else:
        hint = _suggest(key, _field_paths()) or suggest_key(key)
        raise ConfigError(f"{item!r} names neither a sweep field nor a config key{hint}")


def _find_sweep(path: str | Path) -> Path:
    file = Path(path).expanduser()
    if file.is_file():
        return file
    for name in (file.name, f"{file.name}.yaml"):
        if len(file.parts) == 1 and (SWEEP_DIR / name).is_file():
            return SWEEP_DIR / name
    shipped = ", ".join(sorted(p.stem for p in SWEEP_DIR.glob("*.yaml")))
    raise ConfigError(f"sweep file {path} does not exist; shipped sweeps: {shipped or 'none'}")


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a sweep file (or a shipped one by name), apply ``key=value`` items, validate."""
    file = _find_sweep(path)
    try:
        raw = yaml.load(file.read_text(), Loader=_Loader)  # a SafeLoader
    except yaml.YAMLError as exc:
        message = " ".join(str(exc).split())
        raise ConfigError(f"sweep file {file} is not valid YAML: {message}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {file} must hold a mapping (name: ..., base: ..., ...)")
    try:
        for item in overrides:
            _apply_item(raw, item)
        return validate(_build(SweepSpec, raw))
    except ConfigError as exc:
        raise ConfigError(f"{file}: {exc}") from None


# --------------------------------------------------------------------------- validation
def _node(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node._get_node(part)
    return node


def _config_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for key in node:
            keys += [prefix + str(key), *_config_keys(node._get_node(key), f"{prefix}{key}.")]
    return keys


def format_value(value: Any) -> str:
    """A value as ``load_config`` parses it back exactly (floats by repr, bools lowercase)."""
    if hasattr(value, "item") and not isinstance(value, (str, list, dict)):
        value = value.item()  # numpy scalars
    if value is None or isinstance(value, (bool, list, dict, tuple)):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        try:
            same = OmegaConf.from_dotlist([f"v={value}"])["v"] == value
        except Exception:  # a string OmegaConf cannot parse bare
            same = False
        return value if same else json.dumps(value)
    return str(value)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _candidates(key: str, dist: Distribution) -> list[Any]:
    """The values a trial may get, as far as they can be checked: every choice, or the ends."""
    kind, args = dist.kind, dist.args
    where = f"search {key}: {kind}"
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{where} is not a distribution; known: {', '.join(DISTRIBUTIONS)}")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} needs a non-empty list of values, got {args!r}")
        return args
    n = RANGES[kind]
    shape = "[low, high]" if n == 2 else "[low, high, q]"
    if not isinstance(args, list) or len(args) != n or not all(_number(v) for v in args):
        raise ConfigError(f"{where} needs {shape} (numbers), got {args!r}")
    low, high = args[0], args[1]
    if kind == "randint" and not all(isinstance(v, int) for v in args):
        raise ConfigError(f"{where} needs integers [low, high), got {args!r}")
    if low >= high:
        raise ConfigError(f"{where} needs low < high, got {args!r}")
    if "log" in kind and low <= 0:
        raise ConfigError(f"{where} needs low > 0 (a log scale), got {args!r}")
    if n == 3 and args[2] <= 0:
        raise ConfigError(f"{where} needs q > 0, got {args!r}")
    return [low, high - 1] if kind == "randint" else [low, high]  # randint: high is exclusive


def grid_size(spec: SweepSpec) -> int | None:
    """Trials of a grid sweep (product of the value counts); None for random/optuna."""
    if spec.algorithm.name != "grid":
        return None
    return math.prod(len(d.args) for d in spec.search.values())


def strata(spec: SweepSpec) -> int:
    """Grid points of a random sweep's ``grid`` dimensions (1 when it has none).

    A random sweep may mix ``grid`` dimensions, every value of which is tried, with sampled ones:
    each grid point gets ``trials / strata`` trials with their own draws of the sampled values
    (stratified sampling, Ray Tune's ``grid_search`` inside ``num_samples``).
    """
    if spec.algorithm.name != "random":
        return 1
    return math.prod(len(d.args) for d in spec.search.values() if d.kind == "grid")


def metric_names(cfg: Config) -> list[str]:
    """The metrics training logs for ``cfg`` (core.training.module), i.e. what can be selected."""
    terms = [f"{TRAIN_LOSS}/{n.removeprefix('loss_')}" for n, w in cfg.model.loss_weights.items()
             if w > 0]
    return [TRAIN_LOSS, *terms, VAL_LOSS, *(f"val/{name}" for name in cfg.val_metrics)]


def max_steps(spec: SweepSpec, cfg: Config | None = None) -> int:
    """The longest a trial trains: trainer.max_steps, or the largest value searched for it."""
    dist = spec.search.get("trainer.max_steps")
    if dist is None:
        cfg = cfg or load_config(spec.base, spec.overrides)
        return cfg.trainer.max_steps
    return max(_candidates("trainer.max_steps", dist))


def _absolute(path: str) -> str:
    return path if _URI.match(path) else str(Path(path).expanduser().resolve())


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_search(spec: SweepSpec, composed: DictConfig) -> None:
    algo = spec.algorithm.name
    _require(algo in ALGORITHMS, f"algorithm.name {algo!r} is not one of "
             f"{', '.join(ALGORITHMS)}{_suggest(algo, ALGORITHMS)}")
    _require(algo != "optuna" or bool(spec.search),
             "algorithm optuna needs a search: add search: {key: {distribution: args}}")
    for key, dist in spec.search.items():
        node = _node(composed, key)
        hint = "" if node is not None else _suggest(key, _config_keys(composed)) or suggest_key(key)
        _require(node is not None, f"search key {key!r} is not a config key{hint}")
        _require(key != "seed", "search key 'seed' is set per trial (sweep seed + trial index)")
        values = _candidates(key, dist)
        ref = getattr(getattr(node, "_metadata", None), "ref_type", None)
        _require(dist.kind not in FLOAT_RANGES or ref is not int,
                 f"search {key}: {key} is an int: use randint or choice, not {dist.kind}")
        _require(dist.kind != "grid" or algo != "optuna", f"search {key}: grid search is not "
                 "supported by optuna: use choice, or algorithm grid")
        _require(algo != "grid" or dist.kind in ("choice", "grid"),
                 f"search {key}: algorithm grid needs finite choices (choice or grid), not "
                 f"{dist.kind}: use choice, or algorithm random/optuna")
        for value in values:
            item = f"{key}={format_value(value)}"
            try:
                try:  # fast: onto the composed base; on error, load_config words the message
                    to_config(OmegaConf.merge(composed, OmegaConf.from_dotlist([item])))
                except OmegaConfBaseException:
                    load_config(spec.base, [*spec.overrides, item])
            except ConfigError as exc:
                raise ConfigError(f"search {key}: value {value!r} is invalid: {exc}") from None


def _check_resources(res: ResourcesSpec) -> None:
    gpus = res.gpus_per_trial
    _require(res.cpus_per_trial > 0,
             f"resources.cpus_per_trial must be > 0, got {res.cpus_per_trial:g}")
    _require(gpus >= 0, f"resources.gpus_per_trial must be >= 0, got {gpus:g}")
    _require(gpus <= 1 or float(gpus).is_integer(), f"resources.gpus_per_trial={gpus:g}: above "
             f"1, GPUs come whole: use {math.ceil(gpus)}, or a fraction < 1 to pack trials")
    if res.workers is None:
        res.workers = max(1, int(gpus)) if gpus >= 1 else 1
    _require(res.workers >= 1, f"resources.workers must be >= 1 (DDP processes per trial), "
             f"got {res.workers}")
    _require(not 0 < gpus < 1 or res.workers == 1, f"resources.workers={res.workers} with "
             f"gpus_per_trial={gpus:g}: a fractional GPU runs one process: set workers: 1")
    _require(gpus < 1 or gpus % res.workers == 0, f"resources.workers={res.workers} does not "
             f"divide gpus_per_trial={gpus:g}: every DDP worker needs whole GPUs")


def _check_select_and_scheduler(spec: SweepSpec, cfg: Config) -> None:
    valid, sel, sched = metric_names(cfg), spec.select, spec.scheduler
    for what, metric in (("select.metric", sel.metric), ("select.tie_break", sel.tie_break)):
        _require(metric is None or metric in valid, f"{what} {metric!r} is not a metric training "
                 f"logs{_suggest(str(metric), valid)}; valid: {', '.join(valid)}")
    _require(sel.mode in ("max", "min"), f"select.mode must be max or min, got {sel.mode!r}")
    _require(sched.name in SCHEDULERS, f"scheduler.name {sched.name!r} is not one of "
             f"{', '.join(SCHEDULERS)}{_suggest(sched.name, SCHEDULERS)}")
    if sched.name != "asha":
        return
    _require(sched.grace_period is None or sched.grace_period >= 1,
             f"scheduler.grace_period must be >= 1 (training steps), got {sched.grace_period}")
    _require(sched.reduction_factor >= 2,
             f"scheduler.reduction_factor must be >= 2, got {sched.reduction_factor:g}")
    interval = cfg.trainer.val_check_interval
    grace = sched.grace_period or interval
    _require("trainer.val_check_interval" in spec.search or grace >= interval,
             f"scheduler.grace_period={grace} < trainer.val_check_interval={interval}: "
             f"{sel.metric} first exists at step {interval}; use grace_period >= {interval}")
    longest = max_steps(spec, cfg)
    _require(grace < longest, f"scheduler.grace_period={grace} >= trainer.max_steps={longest}: "
             "ASHA would never stop a trial; lower it, or use scheduler none")


def validate(spec: SweepSpec) -> SweepSpec:
    """Check everything a sweep needs before it starts; fills in derived values and returns spec.

    Fills in: absolute ``storage``/``data_dir``/file ``mlflow.tracking_uri``, ``base`` (a shipped
    name or an absolute path), normalized search keys, ``resources.workers``, a grid's ``trials``.
    Loads configs only: no model, data, weights or Ray.
    """
    _require(bool(_NAME.match(spec.name)),
             f"name {spec.name!r} may only use letters, digits, '_', '.', '-'")
    try:
        file = find_config(spec.base)
    except ConfigError as exc:
        raise ConfigError(f"base: {exc}") from None
    spec.base = file.name if file.resolve().parent == CONFIG_DIR else str(file.resolve())
    try:
        composed = compose(spec.base, spec.overrides)
        cfg = to_config(composed)
    except ConfigError as exc:
        raise ConfigError(f"overrides: {exc}") from None
    spec.search = {normalize_key(k): d for k, d in spec.search.items()}
    _check_search(spec, composed)
    size = grid_size(spec)
    if size is not None:
        _require(spec.trials in (None, size),
                 f"trials={spec.trials} but the grid has {size} points: set trials: null or {size}")
        spec.trials = size
    _require(spec.trials is not None and spec.trials >= 1,
             f"trials must be >= 1 for algorithm {spec.algorithm.name}, got {spec.trials}")
    points = strata(spec)
    _require(spec.trials % points == 0,
             f"trials={spec.trials} but the grid dimensions have {points} points, each tried "
             f"equally often: use a multiple of {points}")
    _require(spec.concurrency >= 1,
             f"concurrency must be >= 1 (trials at a time), got {spec.concurrency}")
    _check_resources(spec.resources)
    _check_select_and_scheduler(spec, cfg)
    spec.storage = _absolute(spec.storage or str(DEFAULT_STORAGE))
    spec.data_dir = None if spec.data_dir is None else _absolute(spec.data_dir)
    _require(bool(spec.mlflow.experiment.strip()), "mlflow.experiment must not be empty")
    uri = spec.mlflow.tracking_uri
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())  # a trial's cwd moves
    spec.mlflow.tracking_uri = uri if not uri or ":" in uri else _absolute(uri)
    _require(spec.max_failures >= 0,
             f"max_failures must be >= 0 (retries of a failing trial), got {spec.max_failures}")
    return spec


def check_cluster(spec: SweepSpec, resources: dict[str, float]) -> None:
    """Fail if one trial (``gpus_per_trial`` GPUs, ``cpus_per_trial`` CPUs in total) cannot fit
    the cluster (``ray.cluster_resources()``: ``{"CPU": .., "GPU": ..}``)."""
    res = spec.resources
    for name, need in (("GPU", res.gpus_per_trial), ("CPU", res.cpus_per_trial)):
        have = float(resources.get(name, 0.0))
        if need > have:
            raise ConfigError(f"resources.{name.lower()}s_per_trial={need:g} but the cluster "
                              f"has {have:g} {name}s: lower it or add {name} nodes")


# --------------------------------------------------------------------------- Ray Tune pieces
def param_space(spec: SweepSpec) -> dict[str, Any]:
    """``{dotted config key: tune domain}``; with algorithm grid every dimension is a grid."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.search.items():
        if dist.kind == "grid" or (dist.kind == "choice" and spec.algorithm.name == "grid"):
            space[key] = tune.grid_search(list(dist.args))
        else:
            space[key] = getattr(tune, dist.kind)(*dist.args) if dist.kind != "choice" else (
                tune.choice(list(dist.args)))
    return space


def make_search_alg(spec: SweepSpec) -> Any:
    """The seeded searcher. Searchers carry metric/mode: leave them out of ``TuneConfig``."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    algo = spec.algorithm
    if algo.name == "grid":
        return BasicVariantGenerator(max_concurrent=spec.concurrency)
    if algo.name == "random":
        return BasicVariantGenerator(random_state=algo.seed, max_concurrent=spec.concurrency)
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric=spec.select.metric, mode=spec.select.mode, seed=algo.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=spec.concurrency)


def make_scheduler(spec: SweepSpec, val_check_interval: int) -> Any:
    """FIFO, or ASHA on training steps (trials report ``step``); grace defaults to the interval.

    Caveat (Ray Tune's OptunaSearch): a trial ASHA stops early reaches Optuna as COMPLETE with
    its early value, which skews TPE towards whatever looks good early; Optuna's own pruners are
    off under Tune.
    """
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sched = spec.scheduler
    if sched.name == "none":
        return FIFOScheduler()
    grace = sched.grace_period or val_check_interval
    if grace < val_check_interval:
        raise ConfigError(f"scheduler.grace_period={grace} < trainer.val_check_interval="
                          f"{val_check_interval}: use grace_period >= {val_check_interval}")
    return ASHAScheduler(time_attr=STEP, metric=spec.select.metric, mode=spec.select.mode,
                         grace_period=grace, reduction_factor=sched.reduction_factor,
                         max_t=max_steps(spec))


def num_samples(spec: SweepSpec) -> int:
    """Tune's ``num_samples``: the trials for random/optuna; 1 for a grid (it expands itself); for
    a random sweep with grid dimensions, the trials of each grid point (Tune repeats the grid)."""
    if spec.algorithm.name == "grid":
        return 1
    return int(spec.trials or 1) // strata(spec)


def trial_overrides(spec: SweepSpec, sampled: dict[str, Any]) -> list[str]:
    """Sampled values -> config overrides, sorted by key, that ``load_config`` reads exactly."""
    return [f"{normalize_key(k)}={format_value(sampled[k])}" for k in sorted(sampled)]


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
