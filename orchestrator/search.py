"""A validated sweep as Ray Tune pieces: search space, seeded searcher, scheduler, sample count,
and the config overrides of one trial's sampled values. ``ray`` (and Optuna) are imported only
inside the functions that build Tune objects, so importing this module stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.config.load import normalize_key
from core.errors import ConfigError
from orchestrator.spec_check import format_value, max_steps, strata

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec

# The name core.training.module logs it under (mirrored: importing it costs torch).
STEP = "step"  # reported by every trial; ASHA's time_attr (training steps)


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


def tune_config(spec: SweepSpec, val_check_interval: int, **kwargs: Any) -> Any:
    """Tune's ``TuneConfig``: the searcher (it enforces ``concurrency``), the scheduler and
    :func:`num_samples`; ``kwargs`` go to ``TuneConfig`` as they are."""
    from ray import tune

    return tune.TuneConfig(search_alg=make_search_alg(spec), num_samples=num_samples(spec),
                           scheduler=make_scheduler(spec, val_check_interval), **kwargs)


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What Tune reserves for one trial: its CPUs and GPUs; with ``workers > 1`` a token CPU, as
    the TorchTrainer's workers hold the resources and the trial only drives them."""
    if int(spec.resources.workers or 1) > 1:
        return {"cpu": 0.01}
    return {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}


def trial_overrides(spec: SweepSpec, sampled: dict[str, Any]) -> list[str]:
    """Sampled values -> config overrides, sorted by key, that ``load_config`` reads exactly."""
    return [f"{normalize_key(k)}={format_value(sampled[k])}" for k in sorted(sampled)]
