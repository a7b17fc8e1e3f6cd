"""Every name shared between files, defined once (no torch, no Ray, no MLflow: anyone imports it).

Metric names are what training logs and what sweeps select by; batch keys are what the data
yields and the model reads; run-folder names are the files a training run leaves and the
orchestrator, the registry and the tools read back; environment variables are what a user or a
test may set.
"""

from __future__ import annotations

from pathlib import Path

# ---------------------------------------------------------------- metrics (TensorBoard, MLflow)
METRIC_ARI = "val/ari"  # video FG-ARI on the validation clips
METRIC_MBO = "val/mbo"  # video mBO on the validation clips
VAL_LOSS = "val/loss"
TRAIN_LOSS = "train/loss"  # the weighted total; each term as train/loss/<name without loss_>
TRAIN_LR = "train/lr"
DOWNSTREAM_PREFIX = "downstream"  # downstream/<task>/<metric>: slotsweep evaluate-sweep's numbers


def downstream_metric(task: str, metric: str) -> str:
    """``downstream/linear_probe/accuracy``: a downstream task's number in MLflow and the report."""
    return f"{DOWNSTREAM_PREFIX}/{task}/{metric}"


# ---------------------------------------------------------------- batch keys
VIDEO_KEY = "video"  # (B, T, 3, H, W) normalised frames
MASKS_KEY = "masks"  # (B, T, H, W) instance ids, 0 = background
FEATURES_KEY = "features"  # (B, T, P, F) backbone features: precomputed input and model output

# ---------------------------------------------------------------- a run folder
RESOLVED_CONFIG_NAME = "config.yaml"  # the resolved config of the run
CHECKPOINTS_DIRNAME = "checkpoints"  # step=N.ckpt, best.ckpt
BEST_CHECKPOINT = "best"  # checkpoints/best.ckpt: the best step by the selection metric
BEST_CHECKPOINT_FILE = f"{BEST_CHECKPOINT}.ckpt"
BEST_JSON = "best.json"  # the best step's metrics (a run's, or a sweep's best trial)
DOWNSTREAM_JSON = "downstream.json"  # a sweep's downstream numbers, per task and trial
REPORT_HTML = "report.html"  # a sweep's report, in its folder and as its run's artifact
LAST_CHECKPOINT = "last.ckpt"  # a trial's newest checkpoint, handed to Ray Tune
METRICS_KEY = "slotsweep_metrics"  # in a checkpoint: {"step": N, "metrics": {...}} logged at N


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """``<directory>/step=N.ckpt``: the name of every step checkpoint."""
    return Path(directory) / f"step={step}.ckpt"


def step_of(path: str | Path) -> int:
    """``.../step=2500.ckpt`` -> 2500 (checkpoints sort by step, not by name)."""
    return int(Path(path).stem.split("=", 1)[1])
VISUALS_DIRNAME = "visualizations"  # slot pictures, visualizations/step=N.png
UNSENT_JSON = "mlflow_unsent.json"  # metric values a trial could not send to MLflow (yet)
MLFLOW_JOURNAL = "mlflow_journal.jsonl"  # metric values queued / sent by a live trial process

# ---------------------------------------------------------------- MLflow tags (orchestrator)
TAG_SWEEP = "slotsweep.sweep"  # a run's sweep name
TAG_SWEEP_KEY = "slotsweep.sweep_key"  # the sweep's id (name and storage)
TAG_TRIAL = "trial_id"  # a trial run's Tune trial id: found again on retry and resume
TAG_PARENT = "mlflow.parentRunId"  # MLflow's own: the sweep's parent run
TAG_RERUN_OF = "rerun_of"  # a rerun's original run id
TAG_GIT = "mlflow.source.git.commit"  # MLflow's own
TAG_KIND = "slotsweep.kind"  # sweep | trial | rerun
TAG_SEED = "slotsweep.seed"  # a trial's seed
TAG_THREADS = "slotsweep.torch_threads"  # a rerun uses as many: CPU sums depend on it
TAG_FEATURE_CACHE = "slotsweep.feature_cache"  # the cache folder a trial read, or "none"
TAG_PARTIAL = "slotsweep.partial"  # a sweep run: "false", or "<ended>/<planned> trials ended"

TAG_BEST_STEP = "slotsweep.best_step"  # a trial run: the step its best/<metric> values come from
TAG_SWEEP_BEST = "slotsweep.sweep_best"  # a trial run: "true" on the sweep's best trial
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow's own: which view its UI opens
EXPERIMENT_KIND = "custom_model_development"  # ... the model-training one (not GenAI traces)
UI_VIEW = "workflowType=machine_learning"  # a UI link's query: the model-training view
TAG_NOTE = "mlflow.note.content"  # MLflow's own: a run's description (markdown) in the UI
TAG_SEARCHED = "slotsweep.searched"  # a trial run: "NUM_SLOTS=globals.NUM_SLOTS, tau_ss=..."
SEARCH_PARAM_PREFIX = "search/"  # a trial run's sampled values: search/NUM_SLOTS, search/tau_ss


def short_name(key: str) -> str:
    """A searched config key as a researcher reads it (and MLflow's UI shows it, cut at 20
    characters): ``model.losses.loss_ss.temperature`` -> ``tau_ss``,
    ``model.loss_weights.loss_featrec`` -> ``w_featrec``, ``globals.NUM_SLOTS`` ->
    ``NUM_SLOTS``, ``model.grouper.n_iters`` -> ``n_iters``; anything else: its last part."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] == "loss_weights":
        return "w_" + parts[-1].removeprefix("loss_")
    if len(parts) >= 2 and parts[-1] == "temperature" and parts[-2].startswith("loss_"):
        return "tau_" + parts[-2].removeprefix("loss_")
    return parts[-1]


def short_names(keys: list[str] | tuple[str, ...]) -> dict[str, str]:
    """:func:`short_name` of each key; keys whose short names collide keep their full key."""
    short = {k: short_name(k) for k in keys}
    taken = list(short.values())
    return {k: s if taken.count(s) == 1 else k for k, s in short.items()}


# ---------------------------------------------------------------- Model Registry version tags
# (besides these: the version's metric values by metric name, its sampled values by search key)
VERSION_SWEEP = "sweep"  # the sweep's name
VERSION_TRIAL = "trial"  # the trial's Tune id
VERSION_STEP = "step"  # the checkpoint's training step
VERSION_SOURCE_RUN = "source_run"  # the trial's MLflow run id
VERSION_METRIC = "metric"  # the metric the version was chosen by
VERSION_CHECKPOINT = "checkpoint"  # the checkpoint's artifact URI, runs:/<run id>/checkpoints/...
VERSION_CHECKPOINT_LOCAL = "checkpoint_local"  # the checkpoint's path on the promoting machine

# ---------------------------------------------------------------- environment variables
CACHE_ENV = "SLOTSWEEP_CACHE"  # root of generated data and feature caches (~/.cache/slotsweep)
FEATURE_CACHE_ENV = "SLOTSWEEP_FEATURE_CACHE"  # the feature caches' folder alone
NO_COMPILE_ENV = "SLOTSWEEP_NO_COMPILE"  # 1: the fast step stays eager (no torch.compile)
MLFLOW_DIR_ENV = "SLOTSWEEP_MLFLOW_DIR"  # the embedded MLflow store (default ./runs/mlflow)
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own: the server a sweep logs to
# MLflow's own: retries per HTTP call (its default backs off for minutes on a dead server)
HTTP_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
WARM_DIR_ENV = "SLOTSWEEP_WARM_DIR"  # the warm server's socket, pid and log (CACHE/warm)
FAULT_ENV = "SLOTSWEEP_INJECT_FAULT"  # tests: make a trial fail on purpose
