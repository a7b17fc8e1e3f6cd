"""How numbers and long work read in slotsweep's terminal lines (torch-free: the sweep's driver
uses it)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def duration(seconds: float) -> str:
    """``42s``, ``5m32s``, ``1h02m``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def pace(done: int, left: int, took: float, unit: str) -> list[str]:
    """``["45.1 frames/s", "ETA 15s"]``: the rate of ``done`` units in ``took`` seconds and the
    time the ``left`` units still to do take at that rate; nothing before a first unit, and no
    ETA when none is left."""
    if done <= 0 or took <= 0:
        return []
    rate = done / took
    parts = [f"{rate:.3g} {unit}/s"]
    if left > 0:
        parts.append(f"ETA {duration(left / rate)}")
    return parts


class Progress:
    """Work counted against a known total: silent for the first ``after_s`` seconds (short work
    shows nothing), then tqdm's live bar on a terminal, or elsewhere (a file, CI) a plain line
    ``what: 320/1000 frames (32%) · 45.1 frames/s · ETA 15s`` every ``every_s`` seconds and at
    the end."""

    def __init__(self, what: str, total: int, unit: str, stream: TextIO | None = None,
                 every_s: float = 10.0, after_s: float = 3.0, tty: bool | None = None) -> None:
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream or sys.stderr
        self.every_s, self.after_s = every_s, after_s
        self.tty = self.stream.isatty() if tty is None else tty
        self.done, self.start = 0, time.monotonic()
        self._last: float | None = None  # when the last plain line was written
        self._shown = -1  # the count that line showed
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream,
                             delay=after_s, leave=False, dynamic_ncols=True)

    def line(self, now: float | None = None) -> str:
        took = (time.monotonic() if now is None else now) - self.start
        parts = [f"{self.what}: {self.done}/{self.total} {self.unit} "
                 f"({100 * self.done / max(self.total, 1):.0f}%)"]
        parts += pace(self.done, self.total - self.done, took, self.unit)
        return " · ".join(parts)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self.start < self.after_s:
            return
        if self._last is None or now - self._last >= self.every_s:
            self._last, self._shown = now, self.done
            print(self.line(now), file=self.stream, flush=True)

    def close(self) -> None:
        """The last line, when any was shown and it is not that one already (the bar is
        cleared: the caller says the result)."""
        if self._bar is not None:
            self._bar.close()
        elif self._last is not None and self._shown != self.done:
            print(self.line(), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def fmt(value: Any) -> str:
    """A table cell: ``-`` for no value, floats to four significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain left-aligned text table: headers, a rule of dashes, the rows."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
