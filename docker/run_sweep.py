#!/usr/bin/env python
"""Run a sweep on the Ray cluster this script runs on: the cluster launcher's form,

    ray submit docker/cluster.yaml docker/run_sweep.py -- sweeps/NAME.yaml [key=value ...]

``ray submit`` copies this one file to the head node's home directory (``~/run_sweep.py``) and
runs it there with ``python``; the arguments after ``--`` are ``slotsweep sweep``'s (``--resume``
too). The project itself must already be on the head (the image or ``file_mounts`` of the cluster
YAML): it is found at ``$SLOTSWEEP_HOME``, else ``/home/ray/slotsweep``, else this script's
parent's parent (run from a checkout: ``python docker/run_sweep.py sweeps/NAME.yaml``).

The script sets ``RAY_ADDRESS=auto`` unless it is set, so the sweep joins the running cluster
instead of starting a Ray of its own; changes into the project, so ``sweeps/NAME.yaml`` and the
default storage (``runs/sweeps``) resolve there (a sweep file given relative to the directory
the script was started in is still found); and runs ``dashboards.cli.main(["sweep", *args])``
(``slotsweep sweep``, its report included), exiting with its code: 0 done, 1 every trial
failed, 2 bad input (one line on stderr).

From a machine outside the cluster use the Jobs API instead, which uploads the project:
``slotsweep submit sweeps/NAME.yaml --address http://HEAD:8265``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

HOME_ENV = "SLOTSWEEP_HOME"
CLUSTER_HOME = Path("/home/ray/slotsweep")


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit code 2, as ``slotsweep`` does for bad input."""
    print(f"slotsweep: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _is_project(path: Path) -> bool:
    return (path / "dashboards" / "cli.py").is_file() and (path / "core").is_dir()


def project_dir() -> Path:
    """``$SLOTSWEEP_HOME``, else ``/home/ray/slotsweep``, else this script's parent's parent."""
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        path = Path(env).expanduser().resolve()
        if not _is_project(path):
            _fail(f"{HOME_ENV}={env} is not the slotsweep project (no dashboards/cli.py "
                  "there): fix or unset it")
        return path
    for path in (CLUSTER_HOME, Path(__file__).resolve().parent.parent):
        if _is_project(path):
            return path
    _fail(f"the slotsweep project is not at {CLUSTER_HOME} or next to "
          f"{Path(__file__).resolve()}: set {HOME_ENV} to its folder on the head node")


def main(argv: list[str]) -> int:
    root = project_dir()
    os.environ.setdefault("RAY_ADDRESS", "auto")
    args = list(argv)
    # the sweep file as the user named it from where the script started, if it is there
    if args and not args[0].startswith("-") and "=" not in args[0]:
        given = Path(args[0]).expanduser()
        if not given.is_absolute() and given.is_file() and not (root / given).is_file():
            args[0] = str(given.resolve())
    os.chdir(root)
    sys.path.insert(0, str(root))
    from dashboards.cli import main as slotsweep

    return slotsweep(["sweep", *args])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
