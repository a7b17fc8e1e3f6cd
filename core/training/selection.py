"""How runs and trials are ranked (torch-free: the sweep's driver ranks trials too)."""

from __future__ import annotations

import math
from typing import Any


def selection_key(metrics: dict[str, Any], metric: str, mode: str,
                  tie_break: str | None = None) -> tuple[float, float]:
    """Sort key of a set of metrics under a selection rule: larger is better. ``mode`` max or
    min applies to both ``metric`` and ``tie_break``; a missing or NaN tie-break loses ties."""
    sign = 1.0 if mode == "max" else -1.0
    tie = metrics.get(tie_break) if tie_break else None
    tie_key = sign * float(tie) if tie is not None and not math.isnan(float(tie)) else -math.inf
    return sign * float(metrics[metric]), tie_key
