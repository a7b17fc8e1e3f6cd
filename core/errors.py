"""The one exception type the command line turns into a one-line message (exit code 2)."""

from __future__ import annotations


class SlotsweepError(Exception):
    """A user-facing error: the message names the culprit and the fix, and needs no traceback."""


class DataError(SlotsweepError):
    """Bad or missing data on disk (directory, index file, frame, mask)."""


class ConfigError(SlotsweepError):
    """A configuration key, value or file that cannot be used."""
