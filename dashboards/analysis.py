"""What the report computes from a sweep's numbers (no plotting): short parameter names,
parameter importance, the values a search never tried, and slot diagnostics from masks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dashboards.data import SweepData


def _distribution(dist: Any) -> Any:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    kind, args = dist.kind, list(dist.args)
    if kind in ("choice", "grid"):
        return CategoricalDistribution([a if isinstance(a, (int, float, str, bool)) or a is None
                                        else str(a) for a in args])
    if kind == "randint":
        return IntDistribution(int(args[0]), int(args[1]) - 1)
    return FloatDistribution(float(args[0]), float(args[1]), log="log" in kind)


def param_importance(data: SweepData, metric: str | None = None) -> dict[str, float]:
    """Optuna's fANOVA importance of each searched parameter for ``metric`` (default: the
    selection metric) over the trials that reached it; empty when fewer than 3 trials did or
    nothing varied. Deterministic (seeded)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    metric = metric or data.metric
    trials = [t for t in data.trials if metric in t.metrics and not math.isnan(t.metrics[metric])]
    dists = {k: _distribution(d) for k, d in data.search.items()}
    varied = [k for k in dists if len({str(t.sampled.get(k)) for t in trials}) > 1]
    if len(trials) < 3 or not varied:
        return {}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize" if data.mode == "max" else "minimize")
    for t in trials:
        params = {k: _param(t.sampled.get(k), dists[k]) for k in varied}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={k: dists[k] for k in varied},
            value=float(t.metrics[metric])))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in found.items()}


def _param(value: Any, dist: Any) -> Any:
    from optuna.distributions import CategoricalDistribution

    if isinstance(dist, CategoricalDistribution):
        return value if value in dist.choices else str(value)
    return value


def coverage(data: SweepData) -> list[str]:
    """One warning per searched value no trial was given (choice and grid dimensions) and per
    range whose sampled values all sit in one half of it."""
    warnings = []
    given = [t for t in data.trials if t.sampled]
    for key, dist in data.search.items():
        seen = {str(t.sampled.get(key)) for t in given}
        if dist.kind in ("choice", "grid"):
            missing = [str(v) for v in dist.args if str(v) not in seen]
            if missing:
                warnings.append(f"{key}: never tried {', '.join(missing)} "
                                f"({len(given)} trials so far)")
        elif len(given) >= 4:
            low, high = float(dist.args[0]), float(dist.args[1])
            scale = math.log if "log" in dist.kind else float
            mid = (scale(low) + scale(high)) / 2
            values = [scale(float(t.sampled[key])) for t in given if t.sampled.get(key) is not None]
            if values and (all(v < mid for v in values) or all(v >= mid for v in values)):
                half = "lower" if values[0] < mid else "upper"
                warnings.append(f"{key}: all {len(values)} sampled values lie in the {half} half "
                                f"of [{dist.args[0]}, {dist.args[1]}]")
    return warnings


def slot_diagnostics(masks: np.ndarray, collapse_area: float = 0.9,
                     uniform_entropy: float = 0.95) -> dict[str, Any]:
    """What a trial's slots do on some clips. ``masks``: (N, K, H, W) soft masks summing to 1
    over K. Returns each slot's area (mean share of pixels whose argmax it is), the slots in
    use (area >= 1%), the mean per-pixel entropy divided by log K (0: one slot per pixel,
    1: uniform), and ``collapse``: a reason when one slot covers the frame (area >=
    ``collapse_area``) or masks are near uniform (entropy >= ``uniform_entropy``), else None."""
    k = masks.shape[1]
    owner = masks.argmax(axis=1)  # (N, H, W)
    area = np.array([(owner == i).mean() for i in range(k)])
    p = np.clip(masks, 1e-8, 1.0)
    entropy = float((-(p * np.log(p)).sum(axis=1)).mean() / math.log(k)) if k > 1 else 0.0
    collapse = None
    if k > 1 and entropy >= uniform_entropy:  # first: argmax of a flat mask is meaningless
        collapse = f"masks are near uniform (entropy {entropy:.2f} of the maximum)"
    elif k > 1 and area.max() >= collapse_area:
        collapse = f"slot {int(area.argmax()) + 1} covers {area.max():.0%} of the pixels"
    return {"area": area.round(4).tolist(), "in_use": int((area >= 0.01).sum()), "slots": k,
            "entropy": round(entropy, 4), "collapse": collapse}
