"""``slotsweep sweep FILE [--resume] [key=value ...]``: a whole sweep on Ray Tune.

Order of events: validate the sweep file (nothing started yet) -> MLflow reachable (or the
embedded server started) -> Ray up and big enough -> generated data made once -> trials run
(live table) -> best trial selected over all reported steps -> table + ``<sweep dir>/best.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from core.cli import EXIT_INTERRUPTED
from core.config import find_config
from core.errors import ConfigError, one_line
from core.names import BEST_JSON, UNSENT_JSON
from orchestrator import spec as specs
from orchestrator.mlflow_runs import (
    client_for,
    get_or_create_experiment,
    get_or_create_sweep_run,
    log_params,
    quiet_mlflow,
    run_link,
)
from orchestrator.mlflow_server import (
    LocalServer,
    check_tracking_uri,
    mlflow_root,
    resolve_tracking_uri,
)
from orchestrator.progress import (
    DIVERGED,
    FAILED,
    INTERRUPTED,
    LIFECYCLE,
    ProgressTable,
    fmt,
    interrupted_trials,
)
from orchestrator.ray_logs import quiet_ray
from orchestrator.results import print_summary, select_best, summarize_trial
from orchestrator.search import param_space, trial_resources, tune_config
from orchestrator.spec_check import check_cluster, max_steps
from orchestrator.sweep_control import sweep_lock, term_as_interrupt
from orchestrator.sweep_end import record_end
from orchestrator.trial import (
    TrialContext,
    run_trial,
    trial_dirname,
)

SPEC_YAML = "sweep.yaml"
# Set in a warm server's process (dashboards/warm_server.py): its embedded MLflow server serves
# every sweep it runs, and its Ray instance stays up between them.
WARM_MLFLOW: LocalServer | None = None


def sweep_dir_of(spec: specs.SweepSpec) -> Path:
    """The sweep's own folder: trial runs, ``sweep.yaml`` and ``best.json`` (local or NFS)."""
    storage = spec.storage or str(specs.DEFAULT_STORAGE)
    if "://" in storage:  # s3://..., gs://...: Tune state goes there, run folders stay local
        return (Path.cwd() / specs.DEFAULT_STORAGE / spec.name).resolve()
    return Path(storage).resolve() / spec.name


def _quiet() -> None:
    """Keep the terminal for our table: no Ray/MLflow chatter that a user cannot act on."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    quiet_mlflow()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune banner


def local_resources() -> dict[str, float]:
    """What a local Ray instance would have: this machine's cores and the CUDA devices Ray's own
    detection counts (NVML, narrowed by ``CUDA_VISIBLE_DEVICES``), without importing torch."""
    try:
        from ray._private.accelerators import NvidiaGPUAcceleratorManager as Nvidia

        visible = Nvidia.get_current_process_visible_accelerator_ids()
        gpus = len(visible) if visible is not None else Nvidia.get_current_node_num_accelerators()
    except (ImportError, AttributeError):  # a Ray without this (private) helper
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def _start_ray(spec: specs.SweepSpec) -> dict[str, float]:
    import ray

    quiet_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **kwargs)
        else:
            from orchestrator.warm import start_local_ray

            start_local_ray(**kwargs)
    resources = ray.cluster_resources()
    check_cluster(spec, resources)
    return resources


def _prepare_data(spec: specs.SweepSpec, stream: TextIO) -> bool:
    """Make generated data (if the config asks for it) once, here; returns whether trials use
    the frozen backbone's feature cache. Trials find it, or the first to need it builds it
    under a lock while the others wait and then read it: finding a cache's key imports torch
    and builds the backbone, which every trial does anyway, so the driver does not (~3 s
    before the first trial could start)."""
    from core.config import load_config
    from core.data.feature_cache.key import refusal
    from core.data.prepare import ensure_synthetic

    cfg = load_config(spec.base, spec.overrides)
    ensure_synthetic(cfg.dataset, spec.data_dir)
    if cfg.feature_cache.mode == "off":
        return False
    why = refusal(cfg)
    if why is not None:
        print(f"feature cache: not used: {why}", file=stream)
        return False
    return True


def _say_cache(trials: list[dict[str, Any]], stream: TextIO) -> None:
    """The feature cache the trials read (reported by each trial that ran in one process)."""
    roots = [t.get("feature_cache") for t in trials]
    for root in sorted({r for r in roots if r}):
        print(f"feature cache: {root} (read by {roots.count(root)} of {len(trials)} trials "
              "instead of running the backbone)", file=stream)


def _trainable(spec: specs.SweepSpec, ctx: TrialContext) -> Any:
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(spec))


def _tuner(spec: specs.SweepSpec, trainable: Any, resume: bool) -> Any:
    from ray import tune

    from core.config import load_config

    if resume:
        return tune.Tuner.restore(f"{spec.storage}/{spec.name}", trainable, resume_errored=True)
    cfg = load_config(spec.base, spec.overrides)
    metrics = [spec.select.metric] + ([spec.select.tie_break] if spec.select.tie_break else [])
    progress = ProgressTable(metrics, list(spec.search), planned=int(spec.trials),
                             max_steps=max_steps(spec, cfg), mode=spec.select.mode)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        # reuse_actors: a warm worker skips re-importing torch + Lightning (~6 s)
        tune_config=tune_config(spec, cfg.trainer.val_check_interval, reuse_actors=True,
                                trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=spec.storage,
            verbose=0,
            callbacks=[progress],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )


def _check_resume(spec: specs.SweepSpec, resume: bool) -> None:
    """``--resume`` needs a sweep to finish; without it an existing sweep is never overwritten."""
    from ray import tune

    experiment = f"{spec.storage}/{spec.name}"
    exists = tune.Tuner.can_restore(experiment)
    if resume and not exists:
        raise ConfigError(f"no sweep to resume at {experiment}: run it without --resume")
    if not resume and exists:
        raise ConfigError(
            f"sweep {spec.name} already exists at {experiment}: add --resume to finish it, "
            f"or pick another name (name=...)"
        )


def run_sweep(path: str | Path, overrides: list[str] | tuple = (), resume: bool = False,
              stream: TextIO | None = None,
              on_progress: Callable[[Path, str, bool], None] | None = None) -> int:
    """Run (or with ``resume`` finish) the sweep in ``path``; returns the exit code.

    ``on_progress(sweep_dir, tracking_uri, final)``: called from a background thread every
    ``PROGRESS_EVERY_S`` while trials run (one call at a time), and once with ``final`` after
    ``best.json`` is written; its errors never stop the sweep (one warning line)."""
    stream = stream or sys.stdout
    _quiet()
    spec = specs.load_sweep(path, overrides)
    spec = replace(spec, base=str(find_config(spec.base).resolve()))  # trials: their own cwd
    sweep_dir = sweep_dir_of(spec)
    if not os.environ.get("RAY_ADDRESS"):  # local: the cluster is this machine, check it first
        check_cluster(spec, local_resources())
    uri = resolve_tracking_uri(spec.mlflow.tracking_uri)
    if uri is not None:
        check_tracking_uri(uri)
    with sweep_lock(sweep_dir):  # after the checks: a refused sweep leaves nothing behind
        return _run_locked(spec, sweep_dir, path, overrides, resume, stream, uri, on_progress)


def _run_locked(spec: specs.SweepSpec, sweep_dir: Path, path: str | Path,
                overrides: list[str] | tuple, resume: bool, stream: TextIO,
                uri: str | None, on_progress: Callable[[Path, str, bool], None] | None) -> int:
    _check_resume(spec, resume)
    use_cache = _prepare_data(spec, stream)
    server = None
    if uri is None:  # a warm server's, or one that comes up while Ray starts
        server = WARM_MLFLOW or LocalServer.start(mlflow_root(), wait=False)
        uri = server.uri
    try:
        _start_ray(spec)
        if server is not None and server is not WARM_MLFLOW:
            server.wait_ready()
            server.keep_alive()  # a server that dies mid-sweep comes back; trials keep their calls
        client = client_for(uri)
        experiment_id = get_or_create_experiment(client, spec.mlflow.experiment)
        parent = get_or_create_sweep_run(client, experiment_id, specs.sweep_key(spec),
                                                  spec.name)
        print(f"sweep {spec.name}: {sweep_dir}", file=stream)
        print(f"MLflow: {uri} (experiment {spec.mlflow.experiment}, run {parent})", file=stream)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (sweep_dir / SPEC_YAML).write_text(specs.to_yaml(spec))
            client.log_artifact(parent, str(sweep_dir / SPEC_YAML))
            log_params(client, parent, specs.to_dict(spec))  # searcher seed too
        ctx = TrialContext(spec, str(sweep_dir), uri, experiment_id, parent,
                           build_cache=use_cache)
        tuner = _tuner(spec, _trainable(spec, ctx), resume)
        for seen in LIFECYCLE.values():
            seen.clear()
        with term_as_interrupt(), _every(PROGRESS_EVERY_S, on_progress and (
                lambda: _progress(on_progress, sweep_dir, uri, False))):
            results = tuner.fit()
        trials = [summarize_trial(spec, sweep_dir, r) for r in results]
        cut = interrupted_trials()
        ended = len(trials) - len(cut)  # done, stopped by the scheduler, failed, diverged
        complete = not cut and len(trials) >= int(spec.trials)
        for t in trials:
            if t["trial_id"] in cut:
                t["state"] = INTERRUPTED
        best = select_best(spec, trials)
        print_summary(spec, trials, best, stream)
        _say_cache(trials, stream)
        record = {
            "sweep": spec.name, "select": {"metric": spec.select.metric, "mode": spec.select.mode,
                                           "tie_break": spec.select.tie_break},
            "complete": complete, "trials_ended": ended, "trials_planned": int(spec.trials),
            "best": best, "trials": trials,
            "mlflow": {"tracking_uri": uri, "experiment": spec.mlflow.experiment,
                       "experiment_id": experiment_id, "parent_run_id": parent,
                       "embedded_store": str(mlflow_root()) if server is not None else None},
        }
        (sweep_dir / BEST_JSON).write_text(json.dumps(record, indent=1, default=str))
        failed = [t for t in trials if t["state"] in (FAILED, DIVERGED)]
        resume = shlex.join(["slotsweep", "sweep", str(path), *overrides, "--resume"])
        if not complete:
            print(f"\nsweep interrupted: {ended} of {spec.trials} trials ended; finish it with\n"
                  f"  {resume}", file=stream)
        elif any(t["state"] == FAILED for t in failed):
            print(f"\n{sum(t['state'] == FAILED for t in failed)} trial(s) failed (reasons "
                  f"above); once the cause is fixed, retry them from their last checkpoints "
                  f"with\n  {resume}", file=stream)
        if best is not None:
            print(f"\n{'best' if complete else 'best so far'}: trial {best['trial_id']} at step "
                  f"{best['step']}: "
                  + "  ".join(f"{k}={fmt(v)}" for k, v in best["metrics"].items()), file=stream)
            print(f"  checkpoint: {best['checkpoint']}", file=stream)
            print(f"  written: {sweep_dir / BEST_JSON}", file=stream)
        if server is not None:
            print(f"MLflow UI: `slotsweep ui` then open "
                  f"{run_link('http://127.0.0.1:5000', experiment_id)} (store: {mlflow_root()})",
                  file=stream)
        else:
            print(f"MLflow UI: {run_link(uri, experiment_id)}", file=stream)
        if on_progress is not None:
            _progress(on_progress, sweep_dir, uri, True)
        all_failed = bool(trials) and len(failed) == len(trials)
        status = "FAILED" if all_failed else "FINISHED" if complete else "KILLED"
        partial = "false" if complete else f"{ended}/{spec.trials} trials ended"
        missing = record_end(client, uri, parent, sweep_dir, trials, best, status, partial)
        if missing:
            print(f"slotsweep: MLflow at {uri} misses {'; '.join(missing)}. The results are in "
                  f"{sweep_dir / BEST_JSON} and the checkpoints on disk; unsent values are kept "
                  f"in each trial's {UNSENT_JSON} and sent by --resume", file=sys.stderr)
        if all_failed:
            print(f"slotsweep: all {len(trials)} trials failed", file=sys.stderr)
            return 1
        if not complete:
            return EXIT_INTERRUPTED
        return 1 if missing else 0
    finally:
        if server is not None and server is not WARM_MLFLOW:
            server.stop()


PROGRESS_EVERY_S = 60.0


def _progress(call: Callable[[Path, str, bool], None], sweep_dir: Path, uri: str,
              final: bool) -> None:
    try:
        call(sweep_dir, uri, final)
    except Exception as exc:  # a report is a view: it never stops the sweep
        print(f"slotsweep: warning: sweep progress hook failed ({one_line(exc)})",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def _every(seconds: float, call: Callable[[], None] | None) -> Iterator[None]:
    """Call ``call`` every ``seconds`` in a daemon thread while the block runs (none at once)."""
    if call is None:
        yield
        return
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            call()

    thread = threading.Thread(target=loop, name="slotsweep-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized() and WARM_MLFLOW is None:
        ray.shutdown()

