"""``slotsweep rerun RUN_ID [key=value ...]``: one trial again, locally, with ``core`` alone.

The trial's resolved config comes from its MLflow run (artifact ``config/config.yaml``), the
sweep's data settings from its parent run; training runs in this process (no Ray) into a new
MLflow run tagged ``rerun_of`` and nested under the trial's run (``rerun-of-<trial run name>-<n>``,
folder ``<log dir>/<trial run name>-<n>``). With no override, a CPU rerun repeats the trial's
losses and validation metrics step for step (reading frames or cached features, as the trial did).
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from core.errors import SlotsweepError
from core.names import (
    METRIC_ARI,
    METRIC_MBO,
    TAG_FEATURE_CACHE,
    TAG_KIND,
    TAG_PARENT,
    TAG_RERUN_OF,
    TAG_THREADS,
    TRAIN_LOSS,
)
from orchestrator.mlflow_runs import ARTIFACT_CONFIG, client_for, filter_value, finish_run
from orchestrator.registry import open_store
from orchestrator.trial_logger import TrialLogger

RERUN_DIR = Path("runs") / "reruns"
COMPARED = (TRAIN_LOSS, METRIC_ARI, METRIC_MBO)


def _get_run(client: Any, run_id: str, uri: str) -> Any:
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise SlotsweepError(f"unknown MLflow run {run_id} at {uri}: copy the id from the sweep "
                             "table, best.json or the MLflow UI") from None


def compare(client: Any, original: str, rerun: str, keys: tuple[str, ...] = COMPARED) -> dict:
    """``{metric: (steps compared, max |difference|)}`` over the steps both runs logged."""
    out = {}
    for key in keys:
        a = {m.step: m.value for m in client.get_metric_history(original, key)}
        b = {m.step: m.value for m in client.get_metric_history(rerun, key)}
        steps = sorted(set(a) & set(b))
        diffs = [abs(a[s] - b[s]) for s in steps if not (math.isnan(a[s]) and math.isnan(b[s]))]
        out[key] = (len(steps), max(diffs) if diffs else 0.0)
    return out


def _feature_cache_overrides(run: Any) -> list[str]:
    """Read frames or cached features as the trial did (its ``slotsweep.feature_cache`` tag), so
    the rerun's losses are the trial's: the same cache folder when it is on this machine, else
    the same features built here (``mode=build``). Overrides given to rerun come after these."""
    tag = run.data.tags.get(TAG_FEATURE_CACHE)
    if tag is None:  # logged before the cache existed: let the config decide
        return []
    if tag == "none":
        return ["feature_cache.mode=off"]
    folder = Path(tag)
    if (folder / "manifest.json").is_file():
        return ["feature_cache.mode=build", f"feature_cache.dir={folder.parent}"]
    return ["feature_cache.mode=build"]


def _sweep_params(client: Any, run: Any) -> dict[str, str]:
    """The params of the sweep run above ``run`` (a trial's, or a rerun's trial's); {} if none."""
    while run.data.tags.get(TAG_RERUN_OF):
        run = client.get_run(run.data.tags[TAG_RERUN_OF])
    parent_id = run.data.tags.get(TAG_PARENT)
    return client.get_run(parent_id).data.params if parent_id else {}


def rerun_name(client: Any, run: Any, log_dir: str | Path) -> tuple[str, Path]:
    """The next rerun of ``run``: its MLflow run name ``rerun-of-<run name>-<n>`` and its folder
    ``<log_dir>/<run name>-<n>``; n counts the run's reruns in MLflow (1, 2, ...) and skips a
    name or folder already taken."""
    run_id = run.info.run_id
    base = run.info.run_name or run_id[:8]
    reruns = client.search_runs([run.info.experiment_id],
                                f"tags.{TAG_RERUN_OF} = {filter_value(run_id, 'run id')}",
                                max_results=10000)
    taken = {r.info.run_name for r in reruns}
    folder = re.sub(r"[^\w.-]", "_", base)
    n = len(reruns) + 1
    while f"rerun-of-{base}-{n}" in taken or (Path(log_dir) / f"{folder}-{n}").exists():
        n += 1
    return f"rerun-of-{base}-{n}", Path(log_dir) / f"{folder}-{n}"


def rerun(run_id: str, overrides: list[str] | tuple = (), tracking_uri: str | None = None,
          log_dir: str | Path = RERUN_DIR) -> dict[str, Any]:
    """Train the trial of MLflow run ``run_id`` again here; returns the new run and a comparison."""
    from core.config import flatten, load_config
    from core.train import train
    from core.training.trainer import best_checkpoint

    uri, server = open_store(tracking_uri)
    try:
        client = client_for(uri)
        original = _get_run(client, run_id, uri)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = client.download_artifacts(run_id, f"{ARTIFACT_CONFIG}/config.yaml",
                                                 tmp)
            except (MlflowException, OSError):
                raise SlotsweepError(f"run {run_id} has no config/config.yaml artifact: it was "
                                     "not logged by slotsweep") from None
            cfg = load_config(path, [*_feature_cache_overrides(original), *overrides])
        params = _sweep_params(client, original)
        data_dir = params.get("data_dir") if params.get("data_dir") not in (None, "None") else None
        run_name, run_dir = rerun_name(client, original, log_dir)
        new = client.create_run(
            original.info.experiment_id, run_name=run_name,
            tags={TAG_RERUN_OF: run_id, TAG_PARENT: run_id, TAG_KIND: "rerun",
                  **({"overrides": " ".join(overrides)} if overrides else {})},
        ).info.run_id
        threads = original.data.tags.get(TAG_THREADS)
        if threads:  # float sums on a CPU depend on the number of threads
            import torch

            torch.set_num_threads(int(threads))
        tie = params.get("select.tie_break")
        best = best_checkpoint(run_dir, params.get("select.metric", METRIC_ARI),
                               params.get("select.mode", "max"),
                               None if tie in (None, "", "None") else tie)
        logger = TrialLogger(uri, new, params=flatten(cfg))
        try:
            result = train(cfg, [best, logger], data_dir=data_dir, run_dir=run_dir,
                           progress_bar=False)
        except BaseException:
            finish_run(client, new, "FAILED")
            raise
        finish_run(client, new, "FINISHED")
        return {"run_id": new, "rerun_of": run_id, "tracking_uri": uri,
                "run_dir": result["run_dir"], "best_checkpoint": result["best_checkpoint"],
                "metrics": result["metrics"], "comparison": compare(client, run_id, new)}
    finally:
        if server is not None:
            server.stop()
