"""A sweep's driver as a process: one driver per sweep (a lock), and SIGTERM handled as Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from core.errors import ConfigError


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM (a cluster's or a user's ``kill``) ends the sweep as Ctrl-C does: Tune saves its
    state, stops the trials and returns, and Ray and MLflow are shut down; Python's default would
    end the driver at once and leave Ray's processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def as_ctrl_c(signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)  # Tune's, while it runs
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:  # SIGINT ignored (a background job) or at its default: stop as Ctrl-C would
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """One driver per sweep: a second ``slotsweep sweep`` of the same name and storage is
    refused before it starts anything. The lock (``flock``, via filelock) is let go when the
    driver ends, also when it is killed, so ``--resume`` after a crash is never refused."""
    lock_path = sweep_dir.parent / f".{sweep_dir.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    holder = lock_path.with_name(lock_path.name + ".pid")
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = holder.read_text().strip() if holder.is_file() else "?"
        raise ConfigError(
            f"sweep {sweep_dir.name} is already running (pid {pid}; lock {lock_path}): wait for "
            "it to end, or pick another name (name=...)") from None
    try:
        holder.write_text(str(os.getpid()))
        yield
    finally:
        lock.release()
