"""Folders a user names on the command line or in a file, checked before any work starts.

Every path a command writes to (``--log-dir``, ``--out``, ``--output-dir``, a sweep's
``storage``, the feature cache) goes through :func:`writable_dir`; a dataset folder
(``--data-dir``) through :func:`given_dir`. Both fail with one line naming the flag or key, the
path and what to do, so an unusable folder is reported in seconds rather than as a traceback after
the first minute of work. Torch-free: config and sweep-file validation call it.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from core.errors import SlotsweepError


class PathError(SlotsweepError):
    """A folder named by the user that cannot be read or written."""


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "it is not writable"
    if exc.errno == errno.ENOSPC:
        return "its disk is full"
    return f"a test write there failed: {exc.strerror or type(exc).__name__}"


def writable_dir(path: str | Path, what: str) -> Path:
    """``path`` made absolute, once it is known that it is (or can become) a folder this process
    can write in; nothing is created. ``what`` names where the path came from (``--log-dir``,
    ``storage``)."""
    target = Path(path).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise PathError(f"{what} {path} is a file, not a folder: give a folder path")
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise PathError(f"{what} {path} cannot be created: {probe} is a file")
    try:  # a real write: os.access says yes to root on read-only mounts and pseudo-filesystems
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise PathError(
            f"{what} {path} cannot be used ({_reason(exc)}): pick a folder you can write to"
        ) from None
    return target


def given_dir(path: str | Path, what: str) -> Path:
    """A folder the user names that a command may read or fill (``--data-dir``: a dataset, or
    where a generated one goes): a file is refused, a missing folder is left to the command."""
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise PathError(f"{what} {path} is a file, not a folder: give the dataset's folder")
    if target.is_dir() and not os.access(target, os.R_OK | os.X_OK):
        raise PathError(f"{what} {path} is not readable: check its permissions")
    return target
