"""One trial of a sweep: sampled values -> overrides -> ``core.config.load_config`` ->
``core.train.train(cfg, callbacks)``, reporting to Tune and logging to the trial's MLflow run;
the sweep's ``select`` rule keeps the trial's ``best.ckpt`` (a ``BestCheckpoint`` callback).

A trial with ``workers > 1`` runs the same steps on several workers (:mod:`orchestrator.trial_ddp`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and Lightning load in the trial, never in the sweep's driver
    import pytorch_lightning as pl

from core.errors import SlotsweepError, one_line
from core.names import (
    CHECKPOINTS_DIRNAME,
    FAULT_ENV,
    LAST_CHECKPOINT,
    SEARCH_PARAM_PREFIX,
    TAG_SEARCHED,
    TAG_SEED,
    TAG_THREADS,
    short_names,
    step_of,
)

RUN_DIRNAME = "trials"
TRIAL_JSON = "trial.json"  # a trial's index, sampled values, overrides, MLflow run, seed, pid
DONE_JSON = "done.json"  # a finished trial's final report: a restarted sweep never retrains it
STATUS_KEY = "slotsweep_status"  # reported by every trial: "running", "done" or "diverged"
ERROR_KEY = "slotsweep_error"
CACHE_KEY = "feature_cache"  # in a trial's final report: the feature cache folder it read
# FAULT_ENV (a testing aid): "raise:<trial index>:<step>", "nan:<trial index>:<step>",
# "hold:<trial index>:<step>" and/or "enospc:<trial index>:<step>", comma-separated
# (orchestrator.trial_callbacks.FaultInjector).


@dataclass
class TrialContext:
    """What every trial needs from the driver (passed with ``tune.with_parameters``)."""

    spec: Any  # orchestrator.spec.SweepSpec (validated)
    sweep_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    # the frozen backbone's feature cache: trials with feature_cache.mode=auto build it when it
    # is missing (the first under a lock; the others wait for it and read it)
    build_cache: bool = False


def trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: ``trial_0003_<id>``; the number is the trial's position in the
    sweep (Tune's experiment tag starts with it, for every search algorithm)."""
    return f"trial_{int(trial.experiment_tag.split('_', 1)[0]):04d}_{trial.trial_id}"


def trial_index(trial_dir: str | Path) -> int:
    """``.../trial_0003_6e7ea_00003`` -> 3: the trial's position (its seed offset)."""
    return int(Path(trial_dir).name.split("_")[1])


def run_dir_of(sweep_dir: str | Path, trial_id: str) -> Path:
    """Where a trial's run (config, checkpoints, TensorBoard, images) lives."""
    return Path(sweep_dir) / RUN_DIRNAME / trial_id


def _config_for(ctx: TrialContext, sampled: dict[str, Any], index: int):
    from core.config import load_config
    from orchestrator.search import trial_overrides

    spec = ctx.spec
    overrides = [*spec.overrides, *trial_overrides(spec, sampled), f"seed={spec.seed + index}"]
    return load_config(spec.base, overrides), overrides


def train_once(ctx: TrialContext, sampled: dict[str, Any], trial_id: str, index: int,
                report: Any, checkpoint_cls: Any, checkpoint: Any,
                ddp: tuple[dict[str, Any], list[pl.Callback]] | None = None,
                rank_zero: bool = True):
    """Train (or continue) one trial to ``trainer.max_steps`` in all (a resumed trial that had
    finished trains no further); returns train()'s result. Runs on every DDP worker; ``ddp``:
    the worker's Trainer arguments and callbacks."""
    import torch

    from core.config import flatten
    from core.train import train
    from core.training.trainer import best_checkpoint
    from orchestrator.mlflow_runs import client_for, get_or_create_trial_run
    from orchestrator.trial_callbacks import FaultInjector, TuneReporter
    from orchestrator.trial_logger import TrialLogger

    cfg, overrides = _config_for(ctx, sampled, index)
    if ctx.build_cache and cfg.feature_cache.mode == "auto":
        cfg = replace(cfg, feature_cache=replace(cfg.feature_cache, mode="build"))
    run_dir = run_dir_of(ctx.sweep_dir, trial_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer_kwargs, ddp_callbacks = ddp or (None, [])
    select = ctx.spec.select
    callbacks: list[pl.Callback] = [
        best_checkpoint(run_dir, select.metric, select.mode, select.tie_break),
        TuneReporter(run_dir, report, checkpoint_cls), *ddp_callbacks,
    ]
    run_id = None
    labels = short_names(list(sampled))
    if rank_zero:
        client = client_for(ctx.tracking_uri)
        run_id = _with_retries(lambda: get_or_create_trial_run(
            client, ctx.experiment_id, ctx.parent_run_id, trial_id,
            run_name=f"{ctx.spec.name}-{index:03d}",
            tags={TAG_SEED: str(cfg.seed), TAG_THREADS: str(torch.get_num_threads()),
                  TAG_SEARCHED: ", ".join(f"{s}={k}" for k, s in labels.items())},
        ))
        # each value once: a searched one under its short name (search/tau_ss reads well in
        # MLflow's columns, cut at 20 characters), the rest under their config keys
        params = {**{k: v for k, v in flatten(cfg).items() if k not in sampled},
                  **{f"{SEARCH_PARAM_PREFIX}{labels[k]}": v for k, v in sampled.items()}}
        callbacks.append(TrialLogger(ctx.tracking_uri, run_id, params=params))
    for fault in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        callbacks.append(FaultInjector(fault, index, run_dir / ".fault-raised"))
    continue_from = newest_checkpoint(run_dir, checkpoint)
    if rank_zero:
        (run_dir / TRIAL_JSON).write_text(json.dumps(
            {"trial_id": trial_id, "index": index, "sampled": sampled, "overrides": overrides,
             "mlflow_run_id": run_id, "seed": cfg.seed, "pid": os.getpid()}, indent=1,
            default=str))
    result = train(
        cfg, callbacks, data_dir=ctx.spec.data_dir, run_dir=run_dir,
        continue_from=continue_from, progress_bar=False,
        trainer_kwargs=trainer_kwargs,
    )
    return result, run_id


def _readable_step(path: Path) -> int | None:
    """The step stored in checkpoint ``path``, or None (one warning line) when it cannot be read:
    a file cut short by a crash or a full disk before writes were atomic. Memory-mapped: the
    tensors are read once, by training."""
    from core.training.checkpoint import read_checkpoint

    try:
        return int(read_checkpoint(path, mmap=True).get("global_step", -1))
    except SlotsweepError as exc:
        print(f"slotsweep: warning: skipping {exc}", file=sys.stderr)
        return None


def newest_checkpoint(run_dir: Path, checkpoint: Any) -> Path | None:
    """The latest readable one of Tune's checkpoint and the trial's own ``step=N.ckpt`` files.

    Tune records a checkpoint in its experiment state only every few seconds, so after the
    driver is killed its last checkpoint can be older than the trial's own files; a damaged file
    is skipped for the one before it."""
    candidates: list[tuple[int, Path]] = []
    read: set[Path] = set()  # already checked by loading
    if checkpoint is not None:
        local = Path(tempfile.mkdtemp(prefix="slotsweep-restore-")) / LAST_CHECKPOINT
        with checkpoint.as_directory() as d:
            shutil.copy(Path(d) / LAST_CHECKPOINT, local)
        step = _readable_step(local)
        if step is not None:
            candidates.append((step, local))
            read.add(local)
    for path in (run_dir / CHECKPOINTS_DIRNAME).glob("step=*.ckpt"):
        try:
            candidates.append((step_of(path), path))
        except ValueError:
            continue
    for _, path in sorted(candidates, key=lambda c: c[0], reverse=True):
        if path in read or _readable_step(path) is not None:
            return path
    return None


def run_trial(sampled: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune function trainable (plain Lightning inside the trial)."""
    import torch
    from ray import tune

    from core.errors import NonFiniteLossError
    from orchestrator.mlflow_runs import client_for, finish_run

    trial_id = tune.get_context().get_trial_id()
    index = trial_index(tune.get_context().get_trial_dir())
    torch.set_num_threads(max(1, int(ctx.spec.resources.cpus_per_trial)))
    workers = int(ctx.spec.resources.workers or 1)
    done = run_dir_of(ctx.sweep_dir, trial_id) / DONE_JSON
    if done.is_file():  # finished before the driver died; Tune's state had not caught up
        tune.report(json.loads(done.read_text()))
        return
    if workers > 1:
        from orchestrator.trial_ddp import run_ddp_trial

        return run_ddp_trial(sampled, ctx, trial_id, index, workers)
    try:
        result, run_id = train_once(ctx, sampled, trial_id, index, tune.report,
                                     tune.Checkpoint, tune.get_checkpoint())
    except NonFiniteLossError as exc:
        diverged(ctx, trial_id, index, str(exc))
        tune.report({STATUS_KEY: "diverged", ERROR_KEY: str(exc)})
        return
    final = {**result["metrics"], "step": result["global_step"], STATUS_KEY: "done",
             CACHE_KEY: result["feature_cache"]}
    done.write_text(json.dumps(final))
    tracking_quietly(f"marking run {run_id} FINISHED",
                      lambda: finish_run(client_for(ctx.tracking_uri), run_id, "FINISHED"))
    tune.report(final)


def tracking_quietly(what: str, call: Any) -> None:
    """An MLflow call at a trial's end that must not fail the trial (its results are on disk;
    the sweep closes runs left RUNNING)."""
    try:
        call()
    except Exception as exc:
        print(f"slotsweep: warning: MLflow {what} failed ({one_line(exc)}); the sweep will "
              "retry it at its end", file=sys.stderr, flush=True)


def _with_retries(call: Any, delays: tuple[float, ...] = (1, 2, 4, 8, 15, 30)) -> Any:
    """``call()`` tried again after each of ``delays`` seconds (an MLflow server restarting);
    the last failure is raised and Tune retries the trial."""
    for delay in delays:
        try:
            return call()
        except Exception:
            time.sleep(delay)
    return call()


def diverged(ctx: TrialContext, trial_id: str, index: int, message: str) -> None:
    """Mark the trial's MLflow run FAILED with the reason (the sweep goes on)."""
    from orchestrator.mlflow_runs import client_for, finish_run, get_or_create_trial_run

    (run_dir_of(ctx.sweep_dir, trial_id) / "diverged.txt").write_text(message + "\n")

    def mark() -> None:
        client = client_for(ctx.tracking_uri)
        run_id = get_or_create_trial_run(
            client, ctx.experiment_id, ctx.parent_run_id, trial_id,
            run_name=f"{ctx.spec.name}-{index:03d}")
        client.set_tag(run_id, "slotsweep.error", message[:5000])
        finish_run(client, run_id, "FAILED")

    tracking_quietly(f"marking the run of trial {trial_id} FAILED", mark)
