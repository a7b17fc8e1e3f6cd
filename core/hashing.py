"""Short, stable names from content: one sha256 idiom for every cache key and id in slotsweep."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_digest(obj: Any, length: int) -> str:
    """The first ``length`` hex digits of the sha256 of ``obj`` as JSON with sorted keys.

    Used for the folder of generated data, the feature cache's folder and a sweep's id, so the
    same inputs give the same name on every machine and in every run.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:length]
