"""The ``slotsweep`` command: core's commands (``core.cli``: train, extract-features, visualize,
cache-features, make-data, check-data; evaluate and finetune from ``core.downstream``) and the
orchestrator's (sweep, submit, promote, rerun, ui; evaluate-sweep from
``orchestrator.downstream``), each added by its own ``add_<command>(subparsers)``.

Every sub-command turns bad input into one line on stderr and exit code 2 (``core.cli.run``).
Heavy imports (torch, Ray, MLflow) happen inside the commands so ``slotsweep --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from core import cli as core_cli
from core.downstream.cli import add_evaluate
from core.downstream.finetune import add_finetune
from core.errors import SlotsweepError
from orchestrator.downstream import add_evaluate_sweep


def sweep_command(args: argparse.Namespace, on_progress: Any = None,
                  hand_off: Callable[[], int | None] | None = None) -> int:
    """``on_progress``: see :func:`orchestrator.sweep.run_sweep` (the layer above passes its
    report builder). ``hand_off``: called once the file is valid; an exit code means the sweep
    ran elsewhere (the warm server), None that it runs here."""
    from orchestrator.spec import load_sweep

    load_sweep(args.file, list(args.overrides))  # a bad file fails here, in a fraction of a second,
    # before Ray, MLflow and torch are imported (~10 s)
    code = hand_off() if hand_off is not None else None
    if code is not None:
        return code
    from orchestrator.sweep import run_sweep, shutdown_ray

    try:
        return run_sweep(args.file, list(args.overrides), resume=args.resume,
                         on_progress=on_progress)
    finally:
        shutdown_ray()


def add_sweep(sub: argparse._SubParsersAction) -> None:
    sweep = sub.add_parser(
        "sweep", help="run a sweep file on Ray Tune (local Ray, embedded MLflow by default)",
        description="Run a sweep. key=value after the file overrides sweep fields (trials=8, "
        "concurrency=1, resources.gpus_per_trial=0.5) or, for any other key, the trials' config. "
        "With `slotsweep up` running for this folder, the sweep runs in that warm server and "
        "its first trial starts in seconds.",
    )
    sweep.add_argument("file", help="sweep YAML (a path, or a name in sweeps/)")
    sweep.add_argument("overrides", nargs="*", help="key=value")
    sweep.add_argument("--resume", action="store_true",
                       help="finish an interrupted sweep: finished trials are kept, interrupted "
                       "ones continue from their last checkpoint")
    sweep.set_defaults(func=sweep_command)


def _submit(args: argparse.Namespace) -> int:
    from orchestrator.submit import submit

    return submit(args.file, args.address, list(args.overrides), follow=args.follow,
                  token=args.token, mlflow_uri=args.mlflow_uri)


def add_submit(sub: argparse._SubParsersAction) -> None:
    subm = sub.add_parser(
        "submit", help="run a sweep file as a Ray job on a cluster (Jobs API)",
        description="Submit a sweep to a Ray cluster: the project is uploaded and the head runs "
        "`slotsweep sweep FILE key=value ...`. The cluster needs an MLflow server every node can "
        "reach (--mlflow-uri, mlflow.tracking_uri or MLFLOW_TRACKING_URI).",
    )
    subm.add_argument("file", help="sweep YAML inside the project (a path, or a name in sweeps/)")
    subm.add_argument("overrides", nargs="*", help="key=value, as for `slotsweep sweep`")
    subm.add_argument("--address", default=None,
                      help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS)")
    subm.add_argument("--follow", action="store_true",
                      help="stream the job's logs; exit 0 if it succeeded, else 1")
    subm.add_argument("--token", default=None,
                      help="the cluster's token (`ray get-auth-token` on the head; default: "
                      "$RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)")
    subm.add_argument("--mlflow-uri", default=None,
                      help="MLflow server for the job (default: the file's, $MLFLOW_TRACKING_URI)")
    subm.set_defaults(func=_submit)


def _promote(args: argparse.Namespace) -> int:
    from orchestrator.registry import promote

    out = promote(args.sweep, name=args.name, alias=args.alias, metric=args.metric,
                  mode=args.mode, tracking_uri=args.tracking_uri)
    print(f"registered {out['name']} version {out['version']} as @{out['alias']}: "
          f"trial {out['trial_id']} step {out['step']}, {out['metric']}={out['score']:.4f}")
    where = (f"tracking URI {out['tracking_uri']}" if out["tracking_uri"] else
             "embedded store: run `slotsweep ui`, then MLFLOW_TRACKING_URI=http://127.0.0.1:5000")
    print(f"  load it: mlflow.pyfunc.load_model('{out['uri']}')  ({where})")
    return 0


def add_promote(sub: argparse._SubParsersAction) -> None:
    prom = sub.add_parser(
        "promote", help="register a sweep's best checkpoint in the MLflow Model Registry")
    prom.add_argument("sweep", help="sweep name (runs/sweeps/NAME), folder or best.json")
    prom.add_argument("--metric", default=None, help="select by this metric instead (val/mbo)")
    prom.add_argument("--mode", choices=("max", "min"), default=None)
    prom.add_argument("--name", default=None, help="registered model name (default: the sweep's)")
    prom.add_argument("--alias", default="champion")
    prom.add_argument("--tracking-uri", default=None)
    prom.set_defaults(func=_promote)


def _rerun(args: argparse.Namespace) -> int:
    from orchestrator.rerun import rerun

    out = rerun(args.run_id, list(args.overrides), tracking_uri=args.tracking_uri,
                log_dir=args.log_dir)
    print(f"rerun of {out['rerun_of']}: MLflow run {out['run_id']}, folder {out['run_dir']}")
    for key, (steps, diff) in out["comparison"].items():
        if steps:
            print(f"  {key}: {steps} steps compared with the original, max |diff| {diff:.3g}")
    return 0


def add_rerun(sub: argparse._SubParsersAction) -> None:
    rer = sub.add_parser("rerun", help="train one trial again locally (no Ray) from its MLflow run")
    rer.add_argument("run_id", help="the trial's MLflow run id")
    rer.add_argument("overrides", nargs="*", help="key=value config overrides")
    rer.add_argument("--tracking-uri", default=None)
    rer.add_argument("--log-dir", default="runs/reruns")
    rer.set_defaults(func=_rerun)


def _ui(args: argparse.Namespace) -> int:
    import time

    from orchestrator.mlflow_server import LocalServer, mlflow_root

    root = Path(args.store).resolve() if args.store else mlflow_root()
    if not (root / "mlflow.db").is_file():
        raise SlotsweepError(f"no MLflow store at {root}: run a sweep first or pass --store DIR")
    with LocalServer.start(root, port=args.port) as server:
        print(f"MLflow UI: {server.uri}  (store {root}; Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)


def add_ui(sub: argparse._SubParsersAction) -> None:
    ui = sub.add_parser("ui", help="serve the embedded MLflow store (runs/mlflow) in a browser")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--store", default=None, help="MLflow folder (default: runs/mlflow)")
    ui.set_defaults(func=_ui)


# The order of `slotsweep --help`.
COMMANDS = (
    core_cli.add_train, add_sweep, add_submit, add_promote, add_rerun, add_ui,
    core_cli.add_extract_features, core_cli.add_visualize, core_cli.add_cache_features,
    core_cli.add_make_data, core_cli.add_check_data, add_evaluate, add_finetune,
    add_evaluate_sweep,
)


def build_parser(extra: Sequence[Callable[[Any], None]] = ()) -> argparse.ArgumentParser:
    """The ``slotsweep`` parser: one sub-parser per command of ``COMMANDS``, then of ``extra``
    (the layer above adds its own: ``dashboards.cli``)."""
    parser = argparse.ArgumentParser(
        prog="slotsweep",
        description="Train slot-attention video models and sweep their hyperparameters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (*COMMANDS, *extra):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slotsweep`` console script."""
    return core_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
