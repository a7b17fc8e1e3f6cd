"""The ``slotsweep`` command at the top of the stack: every command of
:mod:`orchestrator.cli`, plus ``report`` (dashboards read what sweeps wrote) and ``up`` / ``down``
(the warm server, which runs this top-level command for ``slotsweep sweep``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from core import cli as core_cli
from core.errors import SlotsweepError
from orchestrator.cli import build_parser


def _report(args: argparse.Namespace) -> int:
    from dashboards.report import build_report

    path = build_report(args.sweep, out=args.out, top_k=args.top_k,
                        tracking_uri=args.tracking_uri, log=not args.no_log,
                        masks=not args.no_masks)
    print(f"report: {path.resolve()}")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    report = sub.add_parser(
        "report", help="one HTML page of a sweep: leaderboard, effects, curves, masks")
    report.add_argument("sweep", help="the sweep's name (under runs/sweeps), folder or best.json")
    report.add_argument("--out", default=None, help="where to write (default: SWEEP/report.html)")
    report.add_argument("--top-k", type=int, default=4, help="trials whose masks are shown")
    report.add_argument("--tracking-uri", default=None,
                        help="MLflow server (default: the one the sweep used)")
    report.add_argument("--no-log", action="store_true",
                        help="do not log the page to the sweep's MLflow run")
    report.add_argument("--no-masks", action="store_true",
                        help="skip running the trials' models (no masks, no slot diagnostics)")
    report.set_defaults(func=_report)


def add_warm(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser(
        "up", help="keep Ray, MLflow and a trial's imports ready: sweeps here start at once",
        description="Start the warm server: an embedded MLflow server, a local Ray whose idle "
        "workers have imported torch, Lightning and the trial's code. `slotsweep sweep` from "
        "this folder and environment then runs in it, its first step seconds after the "
        "command (a sweep elsewhere, or while it runs another, runs on its own as before).")
    up.add_argument("--idle-minutes", type=float, default=120.0,
                    help="stop after this many minutes without a sweep (default 120)")
    up.set_defaults(func=lambda args: _warm("up", args))
    down = sub.add_parser("down", help="stop the warm server (`slotsweep up`)",
                          description="Stop the warm server; a sweep it runs is stopped as by "
                          "Ctrl-C (`--resume` finishes it).")
    down.set_defaults(func=lambda args: _warm("down", args))


def _warm(command: str, args: argparse.Namespace) -> int:
    from orchestrator import warm

    if command == "up":
        if args.idle_minutes <= 0:
            raise SlotsweepError(f"--idle-minutes must be positive, not {args.idle_minutes:g}")
        return warm.up(args.idle_minutes * 60)
    return warm.down()


def _refresh(sweep_dir: Path, tracking_uri: str, final: bool) -> None:
    """The sweep's report while it runs (no masks: their models would take the trials' CPU)
    and, at the end, the whole page, logged to the sweep's run, its path printed."""
    from dashboards.report import build_report

    path = build_report(sweep_dir, tracking_uri=tracking_uri, masks=final, log=final)
    if final:
        print(f"report: {path}  (slotsweep report {sweep_dir.name} builds it again)", flush=True)


def _sweep_with_report(args: argparse.Namespace) -> int:
    """The sweep, in the warm server when one runs for this folder (``slotsweep up``), or
    here."""
    from orchestrator.cli import sweep_command
    from orchestrator.warm import forward

    return sweep_command(
        args, on_progress=None if args.no_report else _refresh,
        hand_off=lambda: forward(["sweep", args.file, *args.overrides, *["--resume"] * args.resume,
                                  *["--no-report"] * args.no_report]))


def build_top_parser() -> argparse.ArgumentParser:
    """Every command; ``sweep`` also writes the sweep's report as it runs and at its end."""
    parser = build_parser(extra=(add_report, add_warm))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sweep = sub.choices["sweep"]
    sweep.add_argument("--no-report", action="store_true",
                       help="do not write SWEEP/report.html (slotsweep report builds it later)")
    sweep.set_defaults(func=_sweep_with_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slotsweep`` console script."""
    return core_cli.run(build_top_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
