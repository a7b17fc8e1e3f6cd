"""After a sweep: find it, reach its MLflow store, promote its best checkpoint to the Model
Registry (``slotsweep promote``) as the MLflow model of orchestrator/slot_model.py."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from core.errors import SlotsweepError, one_line
from core.names import (
    BEST_JSON,
    CHECKPOINTS_DIRNAME,
    RESOLVED_CONFIG_NAME,
    TRACKING_URI_ENV,
    VERSION_CHECKPOINT,
    VERSION_CHECKPOINT_LOCAL,
    VERSION_METRIC,
    VERSION_SOURCE_RUN,
    VERSION_STEP,
    VERSION_SWEEP,
    VERSION_TRIAL,
    checkpoint_path,
    short_names,
)
from orchestrator import PROJECT_DIR
from orchestrator.mlflow_runs import (
    ARTIFACT_CHECKPOINT,
    client_for,
    filter_value,
    quiet_mlflow,
    upload_once,
)
from orchestrator.mlflow_server import (
    LocalServer,
    check_tracking_uri,
    mlflow_root,
    resolve_tracking_uri,
)

CORE_DIR = PROJECT_DIR / "core"
MODEL_CODE = Path(__file__).with_name("slot_model.py")  # the served model, logged as code
OUTPUT_KEYS = ("slots", "masks", "attn_masks")


def find_sweep_dir(sweep: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """A sweep's folder given by name, folder or best.json, and its ``best.json`` (None while
    it runs). Unknown: one line listing the sweeps there are."""
    from orchestrator.spec import DEFAULT_STORAGE
    from orchestrator.sweep import SPEC_YAML

    given = Path(sweep)
    folders = (given.parent if given.name == BEST_JSON else given, DEFAULT_STORAGE / str(sweep))
    for folder in folders:
        if (folder / SPEC_YAML).is_file() or (folder / BEST_JSON).is_file():
            best = folder / BEST_JSON
            return folder.resolve(), json.loads(best.read_text()) if best.is_file() else None
    known = sorted(p.parent.name for p in DEFAULT_STORAGE.glob(f"*/{SPEC_YAML}"))
    there = f"sweeps under {DEFAULT_STORAGE}: {', '.join(known)}" if known else \
        f"no sweep under {DEFAULT_STORAGE} yet"
    raise SlotsweepError(f"no sweep {sweep} ({there}): pass a sweep's name or folder")


def find_sweep(sweep: str | Path) -> tuple[Path, dict[str, Any]]:
    """``best.json`` of a finished sweep given by name, folder or file, and its contents."""
    folder, record = find_sweep_dir(sweep)
    if record is None:
        raise SlotsweepError(f"sweep {sweep} has no {BEST_JSON} yet ({folder}): it is running or "
                             "was stopped before its end; finish it with slotsweep sweep ... "
                             "--resume")
    return folder / BEST_JSON, record


def open_store(uri: str | None, record: dict[str, Any] | None = None):
    """A tracking URI to talk to, and the server started for it (or None).

    Order: ``uri``; ``MLFLOW_TRACKING_URI``; the sweep's embedded store (a server is started on
    it); the URI the sweep used."""
    quiet_mlflow()
    uri = uri or resolve_tracking_uri(None)
    store = (record or {}).get("mlflow", {}).get("embedded_store")
    if uri is None and (store or (mlflow_root() / "mlflow.db").is_file()):
        server = LocalServer.start(Path(store) if store else mlflow_root())
        return server.uri, server
    uri = uri or (record or {}).get("mlflow", {}).get("tracking_uri")
    if uri is None:
        raise SlotsweepError("no MLflow store: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    check_tracking_uri(uri)
    return uri, None


def _best_step(client: Any, run_id: str, metric: str, mode: str) -> tuple[int, float] | None:
    history = [m for m in client.get_metric_history(run_id, metric) if not math.isnan(m.value)]
    if not history:
        return None
    sign = 1 if mode == "max" else -1
    best = max(history, key=lambda m: (sign * m.value, -m.step))
    return best.step, best.value


def choose(record: dict[str, Any], client: Any, metric: str | None, mode: str | None) -> dict:
    """The (trial, step, checkpoint) to promote: the sweep's best by its own selection metric,
    or, for another ``metric``, the best step of any trial in MLflow's metric history."""
    select = record["select"]
    finished = [t for t in record["trials"]
                if t["state"] in ("DONE", "STOPPED") and t["checkpoint"]]
    if not finished:
        raise SlotsweepError(f"sweep {record['sweep']} has no finished trial with a checkpoint: "
                             "nothing to promote")
    if metric in (None, select["metric"]):
        best = record["best"]
        if best is None:
            raise SlotsweepError(
                f"sweep {record['sweep']} has no trial with a {select['metric']} value: "
                f"finish it (slotsweep sweep ... --resume) or pass --metric")
        return {**best, "metric": select["metric"], "score": best["metrics"][select["metric"]]}
    mode = mode or ("min" if "loss" in metric else "max")
    found = []
    for trial in finished:
        hit = _best_step(client, trial["mlflow_run_id"], metric, mode)
        if hit is not None:
            found.append((trial, *hit))
    if not found:
        raise SlotsweepError(f"no trial of sweep {record['sweep']} logged {metric}")
    sign = 1 if mode == "max" else -1
    trial, step, value = max(found, key=lambda f: sign * f[2])
    checkpoint = checkpoint_path(Path(trial["run_dir"]) / CHECKPOINTS_DIRNAME, step)
    if not checkpoint.is_file():
        raise SlotsweepError(f"trial {trial['trial_id']} has its best {metric} at step {step} but "
                             f"no checkpoint of that step ({checkpoint})")
    at_step = {}  # the trial's metric values at this step (its record holds another step's)
    for key in trial.get("metrics") or {}:
        values = [m.value for m in client.get_metric_history(trial["mlflow_run_id"], key)
                  if m.step == step]
        at_step[key] = values[-1] if values else None
    return {**trial, "step": step, "checkpoint": str(checkpoint), "metric": metric, "score": value,
            "metrics": at_step}


def full_state(run_dir: str | Path, checkpoint: str | Path) -> tuple[Any, dict]:
    """The trial's config and the whole model's state dict at ``checkpoint`` (a frozen backbone
    left out of the file is put back from its own weights file)."""
    from core.config import load_config
    from core.training.checkpoint import load_into
    from core.training.module import SlotModule

    cfg = load_config(Path(run_dir) / RESOLVED_CONFIG_NAME)
    module = SlotModule(cfg)
    load_into(module, checkpoint)
    return cfg, module.model.state_dict()


def _signature(cfg: Any) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    t, s = cfg.dataset.ep_length, cfg.dataset.img_size
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, t, 3, s, s))]),
        outputs=Schema([TensorSpec(f32, (-1, t, -1, -1), name="slots"),
                        TensorSpec(f32, (-1, t, -1, -1, -1), name="masks"),
                        TensorSpec(f32, (-1, t, -1, -1, -1), name="attn_masks")]),
    )


def _version_tags(record: dict[str, Any], chosen: dict[str, Any], checkpoint_uri: str) -> dict:
    """A version's tags: where it comes from, its metric values and its sampled values."""
    tags = {VERSION_SWEEP: record["sweep"], VERSION_TRIAL: chosen["trial_id"],
            VERSION_STEP: chosen["step"], VERSION_SOURCE_RUN: chosen["mlflow_run_id"],
            VERSION_METRIC: chosen["metric"], VERSION_CHECKPOINT: checkpoint_uri,
            VERSION_CHECKPOINT_LOCAL: chosen["checkpoint"]}
    tags |= {m: v for m, v in (chosen.get("metrics") or {}).items() if v is not None}
    tags[chosen["metric"]] = chosen["score"]
    tags |= chosen.get("sampled") or {}
    return {key: str(value) for key, value in tags.items()}


def describe(record: dict[str, Any], chosen: dict[str, Any]) -> str:
    """A version's description: ``sweep S, trial T, step N: val/ari=0.8123 (val/mbo=0.4321);
    sampled: NUM_SLOTS=4, tau_ss=0.1234`` (searched keys by their short names, values to four
    significant digits; the version's tags hold the full keys and values)."""
    text = (f"sweep {record['sweep']}, trial {chosen['trial_id']}, step {chosen['step']}: "
            f"{chosen['metric']}={chosen['score']:.4f}")
    others = [f"{m}={v:.4f}" for m, v in (chosen.get("metrics") or {}).items()
              if v is not None and m != chosen["metric"]]
    if others:
        text += f" ({', '.join(others)})"
    sampled = chosen.get("sampled") or {}
    if sampled:
        short = short_names(list(sampled))
        shown = {short[k]: f"{v:.4g}" if isinstance(v, float) else str(v)
                 for k, v in sampled.items()}
        text += "; sampled: " + ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
    return text


def find_version(client: Any, name: str, tags: dict[str, str]) -> str | None:
    """The newest version of ``name`` registered from the same sweep, trial and step."""
    same = (VERSION_SWEEP, VERSION_TRIAL, VERSION_STEP)
    versions = client.search_model_versions(f"name = {filter_value(name, 'model name')}")
    found = [int(v.version) for v in versions if all(v.tags.get(k) == tags[k] for k in same)]
    return str(max(found)) if found else None


def _register(client: Any, uri: str, name: str, chosen: dict[str, Any]) -> str:
    """Log the checkpoint as a pyfunc model, an MLflow LoggedModel of the trial's experiment
    whose source run is the trial's (no active run: the trial's run stays as it ended), and
    register it as a new version of ``name``."""
    from core.config import config_to_yaml

    run = client.get_run(chosen["mlflow_run_id"])
    cfg, state = full_state(chosen["run_dir"], chosen["checkpoint"])
    # the LoggedModel's name, shown in the experiment's Models tab: no / : . % or quotes
    title = re.sub(r"[/:.%\"']", "-", f"{run.info.run_name or chosen['trial_id']}-step-"
                                        f"{chosen['step']}")
    model = client.create_logged_model(
        run.info.experiment_id, name=title, source_run_id=run.info.run_id,
        params={k: str(v) for k, v in (chosen.get("sampled") or {}).items()})
    try:
        with tempfile.TemporaryDirectory() as tmp, _fluent_uri(uri):
            weights, config = Path(tmp) / "weights.pt", Path(tmp) / RESOLVED_CONFIG_NAME
            torch.save(state, weights)
            config.write_text(config_to_yaml(cfg))
            mlflow.pyfunc.log_model(
                name=title, model_id=model.model_id, python_model=str(MODEL_CODE),
                artifacts={"weights": str(weights), "config": str(config)},
                code_paths=[str(CORE_DIR)], signature=_signature(cfg),
                input_example=np.zeros((2, cfg.dataset.ep_length, 3, cfg.dataset.img_size,
                                        cfg.dataset.img_size), np.float32),
                pip_requirements=["torch", "timm", "omegaconf", "einops", "pytorch-lightning",
                                  "pyarrow", "scipy"],
            )
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    # the client's calls, not mlflow.register_model, which prints "Successfully registered
    # model" / "Created version" to stderr; slotsweep says what it registered in one line
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version = client.create_model_version(name, source=f"models:/{model.model_id}",
                                          model_id=model.model_id, await_creation_for=60)
    return str(version.version)


@contextlib.contextmanager
def _fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent calls (``mlflow.pyfunc.log_model``, ``mlflow.register_model``) talk to
    ``uri`` inside the block only: ``mlflow.set_tracking_uri`` also sets MLFLOW_TRACKING_URI in
    the environment, which would outlive the promotion (in a test session, or a later command
    of the same process) pointing at a server that is gone."""
    before = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unsets the variable too
        if before is not None:
            os.environ[TRACKING_URI_ENV] = before


def promote(sweep: str | Path, name: str | None = None, alias: str = "champion",
            metric: str | None = None, mode: str | None = None,
            tracking_uri: str | None = None) -> dict[str, Any]:
    """Point ``name@alias`` at the sweep's best checkpoint: the version registered from the same
    trial and step before, else a new one. The trial's MLflow run is not reopened: its status and
    times stay; its checkpoint is uploaded to it when missing."""
    _, record = find_sweep(sweep)
    uri, server = open_store(tracking_uri, record)
    try:
        client = client_for(uri)
        chosen = choose(record, client, metric, mode)
        name = name or record["sweep"]
        try:
            checkpoint = upload_once(client, chosen["mlflow_run_id"], chosen["checkpoint"],
                                     ARTIFACT_CHECKPOINT)
            tags = _version_tags(record, chosen, checkpoint)
            version = find_version(client, name, tags) or _register(client, uri, name, chosen)
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            client.update_model_version(name, version, description=describe(record, chosen))
            client.set_registered_model_alias(name, alias, version)
        except MlflowException as exc:
            raise SlotsweepError(_registry_error(uri, exc)) from None
        return {"name": name, "version": version, "alias": alias, "uri": f"models:/{name}@{alias}",
                "tracking_uri": None if server is not None else uri,
                **{k: chosen[k] for k in ("trial_id", "step", "checkpoint")},
                "checkpoint_uri": checkpoint, "metric": chosen["metric"],
                "score": chosen["score"]}
    finally:
        if server is not None:
            server.stop()


def _registry_error(uri: str, exc: MlflowException) -> str:
    text = one_line(exc, 200)
    if "registry" in text.lower() or "not supported" in text.lower():
        return (f"the MLflow store at {uri} has no model registry ({text}): use a database-backed "
                "store (the embedded SQLite server, or a server on Postgres)")
    return f"MLflow at {uri} refused the model ({text})"
