"""Shared names are defined once, in core/names.py: no product file spells one out again."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import core.names

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("core", "orchestrator", "dashboards")


def _distinctive() -> dict[str, str]:
    """The names whose values cannot be mistaken for another word: metric names, file names,
    environment variables (``"video"`` or ``"best"`` also name unrelated things)."""
    values = {k: v for k, v in vars(core.names).items() if k.isupper() and isinstance(v, str)}
    return {k: v for k, v in values.items() if re.search(r"[/.]|^SLOTSWEEP_", v)}


def test_every_distinctive_name_is_spelt_out_only_in_core_names():
    names = _distinctive()
    assert {"METRIC_ARI", "BEST_JSON", "RESOLVED_CONFIG_NAME", "CACHE_ENV"} <= set(names)
    found = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "core" / "names.py":
                continue
            text = path.read_text()
            for key, value in names.items():
                for quote in ('"', "'"):
                    if f"{quote}{value}{quote}" in text:
                        found.append(f"{path.relative_to(ROOT)}: {value!r} (use core.names.{key})")
    assert not found, "\n".join(found)


def test_core_names_imports_only_the_standard_library():
    source = (ROOT / "core" / "names.py").read_text()
    imported = [m.group(2).split(".")[0]
                for m in re.finditer(r"^(import|from) (\S+)", source, re.MULTILINE)]
    assert imported and all(name in sys.stdlib_module_names for name in imported), imported
