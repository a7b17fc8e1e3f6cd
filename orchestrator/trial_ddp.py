"""A trial on several workers (several GPUs, or 2 gloo workers on a CPU): the same ``train``
inside a Ray Train ``TorchTrainer`` with the ``ray.train.lightning`` helpers (Ray 2.60: Train V2
inside a Tune function); its Train run is named after the trial, so a restarted trial resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from core.names import step_of
from orchestrator.trial import (
    DONE_JSON,
    ERROR_KEY,
    STATUS_KEY,
    TrialContext,
    diverged,
    newest_checkpoint,
    run_dir_of,
    tracking_quietly,
    train_once,
)


class RayPrepared(pl.Callback):
    """``ray.train.lightning.prepare_trainer`` on the Trainer of a DDP trial's worker, as fitting
    starts (it checks the Ray strategy and cluster environment)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from ray.train.lightning import prepare_trainer

        prepare_trainer(trainer)


def _ddp_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a DDP trial: Lightning with RayDDPStrategy."""
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment

    ctx, sampled, trial_id, index = (config["ctx"], config["sampled"], config["trial_id"],
                                     config["index"])
    use_gpu = torch.cuda.is_available() and ctx.spec.resources.gpus_per_trial > 0
    accelerator = "gpu" if use_gpu else "cpu"
    trainer_kwargs = {
        "strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()],
        "devices": "auto", "accelerator": accelerator, "num_nodes": 1,
    }
    rank_zero = ray.train.get_context().get_world_rank() == 0
    train_once(ctx, sampled, trial_id, index, ray.train.report, ray.train.Checkpoint,
                ray.train.get_checkpoint(), (trainer_kwargs, [RayPrepared()]),
                rank_zero=rank_zero)


def run_ddp_trial(sampled: dict[str, Any], ctx: TrialContext, trial_id: str, index: int,
                   workers: int) -> None:
    from ray import train as ray_train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.mlflow_runs import client_for, find_trial_run, finish_run

    resources = ctx.spec.resources
    gpus = float(resources.gpus_per_trial)
    per_worker = {"CPU": max(0.5, float(resources.cpus_per_trial) / workers)}
    if gpus:
        per_worker["GPU"] = gpus / workers
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"ctx": ctx, "sampled": sampled, "trial_id": trial_id,
                           "index": index},
        scaling_config=ray_train.ScalingConfig(
            num_workers=workers, use_gpu=bool(gpus), resources_per_worker=per_worker),
        run_config=ray_train.RunConfig(
            name=trial_id, storage_path=str(Path(ctx.sweep_dir) / "train"),
            callbacks=[TuneReportCallback()],
            failure_config=ray_train.FailureConfig(max_failures=0),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; a NaN is a diverged trial, not a retry
        message = str(exc)
        if "became nan" in message or "became inf" in message:
            diverged(ctx, trial_id, index, message.splitlines()[-1])
            tune.report({STATUS_KEY: "diverged", ERROR_KEY: message.splitlines()[-1]})
            return
        raise
    run_dir = run_dir_of(ctx.sweep_dir, trial_id)
    newest = newest_checkpoint(run_dir, None)
    final = {"step": step_of(newest) if newest else 0, STATUS_KEY: "done"}
    (run_dir / DONE_JSON).write_text(json.dumps(final))

    def close() -> None:
        client = client_for(ctx.tracking_uri)
        run = find_trial_run(client, ctx.experiment_id, ctx.parent_run_id, trial_id)
        if run is not None:
            finish_run(client, run, "FINISHED")

    tracking_quietly(f"closing the run of trial {trial_id}", close)
    tune.report(final)
