"""The one exception type the command line turns into a one-line message (exit code 2)."""

from __future__ import annotations


def one_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), else its type's name."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


class SlotsweepError(Exception):
    """A user-facing error: the message names the culprit and the fix, and needs no traceback."""


class DataError(SlotsweepError):
    """Bad or missing data on disk (directory, index file, frame, mask)."""


class ConfigError(SlotsweepError):
    """A configuration key, value or file that cannot be used."""


class NonFiniteLossError(SlotsweepError):
    """A loss term became NaN or infinite; training stops before the optimizer step (exit 3)."""

    ADVICE = (
        "reduce the learning rate (optimizer.lr=0.0001), raise gradient clipping "
        "(trainer.gradient_clip_val=0.1), check the data for invalid values"
    )

    def __init__(self, step: int, term: str, value: float) -> None:
        self.step, self.term, self.value = step, term, value
        super().__init__(f"loss {term} became {value} at step {step}: {self.ADVICE}")
