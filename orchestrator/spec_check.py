"""Checks of a composed :class:`~orchestrator.spec.SweepSpec`: everything a sweep needs before
it starts, as one :class:`ConfigError` line naming the culprit and the fix.

:func:`validate` only composes and loads configs (``core.config``): it never builds a model,
reads data or weights, or imports torch or Ray. It also holds what the checks and the Ray Tune
pieces (:mod:`orchestrator.search`) share: a sweep's grid size, strata and longest trial.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from core.config import Config, compose, find_config, load_config, to_config
from core.config.load import CONFIG_DIR, leaf_keys, normalize_key, suggest_key
from core.errors import ConfigError
from core.names import TRAIN_LOSS, VAL_LOSS

if TYPE_CHECKING:
    from orchestrator.spec import ResourcesSpec, SweepSpec

ALGORITHMS = ("random", "grid", "optuna")
SCHEDULERS = ("none", "asha")
RANGES = {"uniform": 2, "loguniform": 2, "randint": 2, "quniform": 3, "qloguniform": 3}
DISTRIBUTIONS = ("choice", "grid", *RANGES)
FLOAT_RANGES = ("uniform", "loguniform", "quniform", "qloguniform")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Distribution:
    """One search dimension: ``{kind: args}`` in the file, e.g. ``{loguniform: [0.03, 0.3]}``."""

    kind: str
    args: Any


def suggest(word: str, options: Sequence[str]) -> str:
    """`` (did you mean X?)`` for the option closest to ``word``, or an empty string."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def node_at(cfg: DictConfig, key: str) -> Any:
    """The node at dotted ``key`` (interpolations unresolved), or None if there is none."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig):
            return None
        node = node._get_node(part, validate_access=False)  # None if absent; a ??? value is kept
    return node


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


def _distribution(key: str, value: Any) -> Distribution:
    if not isinstance(value, dict) or len(value) != 1:
        raise ConfigError(f"search {key}: give exactly one distribution as {{name: args}} "
                          f"({', '.join(DISTRIBUTIONS)}), got {value!r}")
    ((kind, args),) = value.items()
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"search {key}: unknown distribution {kind!r}"
                          f"{suggest(str(kind), DISTRIBUTIONS)}; known: {', '.join(DISTRIBUTIONS)}")
    return Distribution(kind, args)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _candidates(key: str, dist: Distribution) -> list[Any]:
    """The values a trial may get, as far as they can be checked: every choice, or the ends."""
    kind, args = dist.kind, dist.args
    where = f"search {key}: {kind}"
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


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_search(spec: SweepSpec, composed: DictConfig) -> None:
    algo = spec.algorithm.name
    _require(algo in ALGORITHMS, f"algorithm.name {algo!r} is not one of "
             f"{', '.join(ALGORITHMS)}{suggest(algo, ALGORITHMS)}")
    _require(algo != "optuna" or bool(spec.search),
             "algorithm optuna needs a search: add search: {key: {distribution: args}}")
    for key, dist in spec.search.items():
        node = node_at(composed, key)
        hint = "" if node is not None else (suggest(key, list(leaf_keys(composed)))
                                            or suggest_key(key))
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
                 f"logs{suggest(str(metric), valid)}; valid: {', '.join(valid)}")
    _require(sel.mode in ("max", "min"), f"select.mode must be max or min, got {sel.mode!r}")
    _require(sched.name in SCHEDULERS, f"scheduler.name {sched.name!r} is not one of "
             f"{', '.join(SCHEDULERS)}{suggest(sched.name, SCHEDULERS)}")
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

    Fills in: ``base`` (a shipped name or an absolute path), ``search`` as :class:`Distribution`
    under full config keys, ``resources.workers``, a grid's ``trials``.
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
    spec.search = {normalize_key(str(k)): _distribution(str(k), v) for k, v in spec.search.items()}
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
    _require(bool(spec.mlflow.experiment.strip()), "mlflow.experiment must not be empty")
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
