"""How numbers read in slotsweep's terminal lines (torch-free: the sweep's driver uses it)."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """``42s``, ``5m32s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
