"""Digests that name or check content: one helper per kind, shared by every caller in slotsweep."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def json_digest(obj: Any, length: int) -> str:
    """The first ``length`` hex digits of the sha256 of ``obj`` as JSON with sorted keys.

    Used for the folder of generated data, the feature cache's folder and a sweep's id, so the
    same inputs give the same name on every machine and in every run.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]


def file_digest(path: str | Path) -> str:
    """The 128-bit blake2b of a file's bytes (32 hex digits), read in 16 MiB chunks.

    A feature cache's manifest records it for every shard when the shard is written; opening
    the cache compares it again.
    """
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
