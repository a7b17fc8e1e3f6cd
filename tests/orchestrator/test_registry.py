"""After the sweep: promote to the Model Registry and rerun a trial locally (real MLflow server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from core.names import TAG_FEATURE_CACHE
from orchestrator.cli import main
from orchestrator.mlflow_server import LocalServer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One finished 2-trial sweep logged to a real MLflow server."""
    base = tmp_path_factory.mktemp("registry")
    env = {"SLOTSWEEP_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    with LocalServer.start(base / "mlflow") as server:
        argv = ["sweep", str(QUICKSTART), f"storage={base}", "name=reg", "trials=2",
                f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=reg"]
        assert main(argv) == 0
        yield server, base / "reg", json.loads((base / "reg" / "best.json").read_text())
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _checkpoint_outputs(run_dir: str, checkpoint: str, clip: torch.Tensor) -> dict:
    from core.models.build import build_model
    from orchestrator.registry import full_state

    cfg, state = full_state(run_dir, checkpoint)
    model = build_model(cfg).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        out = model({"video": clip})
    return {"slots": out["slots"].numpy(), "masks": out["decoder_masks"].numpy()}


def test_promote_registers_and_the_alias_loads_the_same_model(swept, capsys):
    server, sweep_dir, record = swept
    assert main(["promote", str(sweep_dir), "--name", "slots", "--tracking-uri", server.uri]) == 0
    assert "registered slots version 1 as @champion" in capsys.readouterr().out
    client = MlflowClient(server.uri)
    version = client.get_model_version_by_alias("slots", "champion")
    best = record["best"]
    assert version.version == "1" and version.tags["trial"] == best["trial_id"]
    assert version.tags["source_run"] == best["mlflow_run_id"]
    assert float(version.tags["val/ari"]) == pytest.approx(best["metrics"]["val/ari"])
    mlflow.set_tracking_uri(server.uri)
    loaded = mlflow.pyfunc.load_model("models:/slots@champion")
    clip = torch.randn(2, 2, 3, 56, 56)
    got = loaded.predict(clip.numpy())
    want = _checkpoint_outputs(best["run_dir"], best["checkpoint"], clip)
    assert got["slots"].shape == want["slots"].shape == (2, 2, 4, 16)
    np.testing.assert_allclose(got["slots"], want["slots"], atol=1e-6)
    np.testing.assert_allclose(got["masks"].reshape(want["masks"].shape), want["masks"],
                               atol=1e-6)
    # promoting again (here: by another metric) moves the alias; the old version stays
    assert main(["promote", str(sweep_dir), "--name", "slots", "--metric", "val/mbo",
                 "--tracking-uri", server.uri]) == 0
    moved = client.get_model_version_by_alias("slots", "champion")
    assert moved.version == "2" and moved.tags["metric"] == "val/mbo"
    assert client.get_model_version("slots", "1").version == "1"


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slotsweep: error: ") and "\n" not in err, err
    return err


def test_promote_bad_input(swept, tmp_path, capsys):
    server, sweep_dir, record = swept
    assert "no sweep nowhere" in _error(["promote", "nowhere", "--tracking-uri", server.uri],
                                        capsys)
    failed = {**record, "trials": [{**t, "state": "FAILED"} for t in record["trials"]]}
    (tmp_path / "best.json").write_text(json.dumps(failed))
    err = _error(["promote", str(tmp_path), "--tracking-uri", server.uri], capsys)
    assert "no finished trial" in err
    err = _error(["promote", str(sweep_dir), "--tracking-uri", f"file://{tmp_path}/mlruns"],
                 capsys)
    assert "file" in err.lower()


def test_rerun_reproduces_the_trial_without_ray(swept, tmp_path):
    server, _, record = swept
    trial = record["best"]
    code = (
        "import sys; from orchestrator.cli import main; "
        "a = sys.argv; rc = main(['rerun', a[1], '--tracking-uri', a[2], '--log-dir', a[3]]);"
        " print('RAY_LOADED', any(m.split('.')[0] == 'ray' for m in sys.modules)); sys.exit(rc)"
    )
    env = {**os.environ, "SLOTSWEEP_CACHE": os.environ.get("SLOTSWEEP_CACHE", "")}
    proc = subprocess.run([sys.executable, "-c", code, trial["mlflow_run_id"], server.uri,
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RAY_LOADED False" in proc.stdout
    client = MlflowClient(server.uri)
    reruns = client.search_runs(
        [record["mlflow"]["experiment_id"]],
        filter_string=f"tags.rerun_of = '{trial['mlflow_run_id']}'")
    assert len(reruns) == 1
    new = reruns[0].info.run_id
    for key in ("train/loss", "val/ari", "val/mbo"):
        a = {m.step: m.value for m in client.get_metric_history(trial["mlflow_run_id"], key)}
        b = {m.step: m.value for m in client.get_metric_history(new, key)}
        assert set(a) == set(b) and a, key
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-6), (key, step)


def test_rerun_unknown_run(swept, capsys):
    server, _, _ = swept
    err = _error(["rerun", "0123456789abcdef0123456789abcdef", "--tracking-uri", server.uri],
                 capsys)
    assert "unknown MLflow run 0123456789abcdef0123456789abcdef" in err


def test_a_rerun_reads_frames_or_cached_features_as_its_trial_did(tmp_path):
    from types import SimpleNamespace

    from orchestrator.rerun import _feature_cache_overrides

    def run(tags):
        return SimpleNamespace(data=SimpleNamespace(tags=tags))

    built = tmp_path / "features" / "vit-56px-abc"
    built.mkdir(parents=True)
    (built / "manifest.json").write_text("{}")
    assert _feature_cache_overrides(run({})) == []
    assert _feature_cache_overrides(run({TAG_FEATURE_CACHE: "none"})) == [
        "feature_cache.mode=off"]
    assert _feature_cache_overrides(run({TAG_FEATURE_CACHE: str(built)})) == [
        "feature_cache.mode=build", f"feature_cache.dir={built.parent}"]
    elsewhere = run({TAG_FEATURE_CACHE: "/on/another/machine/vit-56px-abc"})
    assert _feature_cache_overrides(elsewhere) == ["feature_cache.mode=build"]


def test_choose_on_a_sweep_without_a_scored_trial_is_one_line(tmp_path):
    """An interrupted sweep can hold a finished trial with a checkpoint but no selection metric
    (best: null): promote says so instead of failing on the missing record."""
    from core.errors import SlotsweepError
    from orchestrator.registry import choose

    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"x")
    record = {"sweep": "s", "select": {"metric": "val/ari", "mode": "max", "tie_break": None},
              "best": None, "trials": [{"trial_id": "t0", "state": "DONE",
                                        "checkpoint": str(ckpt), "metrics": {}}]}
    with pytest.raises(SlotsweepError, match=r"no trial with a val/ari value: finish it"):
        choose(record, client=None, metric=None, mode=None)
