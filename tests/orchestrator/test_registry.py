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

from core.names import TAG_FEATURE_CACHE, TAG_PARENT, TAG_RERUN_OF, short_names
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


def _as_ended(client, run_id: str) -> tuple:
    run = client.get_run(run_id)
    return (run.info.status, run.info.start_time, run.info.end_time, run.data.metrics,
            run.data.params, run.data.tags)


def test_promote_registers_and_the_alias_loads_the_same_model(swept, capsys, monkeypatch):
    server, sweep_dir, record = swept
    client = MlflowClient(server.uri)
    best = record["best"]
    before = _as_ended(client, best["mlflow_run_id"])
    assert before[0] == "FINISHED" and before[2] is not None
    assert main(["promote", str(sweep_dir), "--name", "slots", "--tracking-uri", server.uri]) == 0
    assert "registered slots version 1 as @champion" in capsys.readouterr().out
    # the trial's run is not reopened: status, start and end time, metrics, params, tags as before
    assert _as_ended(client, best["mlflow_run_id"]) == before
    version = client.get_model_version_by_alias("slots", "champion")
    assert version.version == "1" and version.tags["trial"] == best["trial_id"]
    assert version.tags["source_run"] == best["mlflow_run_id"]
    assert version.run_id == best["mlflow_run_id"]  # the UI links the version to the trial's run
    assert float(version.tags["val/ari"]) == pytest.approx(best["metrics"]["val/ari"])
    # the checkpoint by its artifact URI (the local path apart), the sampled values, a description
    assert version.tags["checkpoint"] == f"runs:/{best['mlflow_run_id']}/checkpoints/best.ckpt"
    assert version.tags["checkpoint_local"] == best["checkpoint"]
    assert mlflow.artifacts.download_artifacts(version.tags["checkpoint"], tracking_uri=server.uri)
    assert best["sampled"] and {k: version.tags[k] for k in best["sampled"]} == {
        k: str(v) for k, v in best["sampled"].items()}
    text = version.description
    assert text.startswith(f"sweep reg, trial {best['trial_id']}, step {best['step']}: "
                           f"val/ari={best['metrics']['val/ari']:.4f}")
    short = short_names(list(best["sampled"]))
    assert all(f"{short[k]}={v:.4g}" in text for k, v in best["sampled"].items()), text
    # promote left MLflow's URI as it found it: a user's own load reads the environment
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    loaded = mlflow.pyfunc.load_model("models:/slots@champion")
    clip = torch.randn(2, 2, 3, 56, 56)
    got = loaded.predict(clip.numpy())
    want = _checkpoint_outputs(best["run_dir"], best["checkpoint"], clip)
    assert got["slots"].shape == want["slots"].shape == (2, 2, 4, 16)
    np.testing.assert_allclose(got["slots"], want["slots"], atol=1e-6)
    np.testing.assert_allclose(got["masks"].reshape(want["masks"].shape), want["masks"],
                               atol=1e-6)


def test_promoting_the_same_step_again_reuses_its_version(swept, capsys):
    server, sweep_dir, record = swept
    client = MlflowClient(server.uri)
    argv = ["promote", str(sweep_dir), "--name", "again", "--tracking-uri", server.uri]
    assert main(argv) == 0
    assert main([*argv, "--alias", "staging"]) == 0
    assert "registered again version 1 as @staging" in capsys.readouterr().out
    assert [v.version for v in client.search_model_versions("name = 'again'")] == ["1"]
    assert client.get_model_version_by_alias("again", "champion").version == "1"
    assert client.get_model_version_by_alias("again", "staging").version == "1"
    # another metric: the same trial and step reuse version 1, another step is version 2
    by_ari = (record["best"]["trial_id"], record["best"]["step"])
    trials = {t["trial_id"]: t for t in record["trials"]}
    before = {t: _as_ended(client, trials[t]["mlflow_run_id"]) for t in trials}
    assert main([*argv, "--metric", "val/mbo"]) == 0
    assert {t: _as_ended(client, trials[t]["mlflow_run_id"]) for t in trials} == before
    moved = client.get_model_version_by_alias("again", "champion")
    assert moved.tags["metric"] == "val/mbo"
    step, run_id = int(moved.tags["step"]), moved.tags["source_run"]
    by_mbo = (moved.tags["trial"], step)
    assert moved.version == ("1" if by_mbo == by_ari else "2")
    assert len(client.search_model_versions("name = 'again'")) == len({by_ari, by_mbo})
    # chosen by another metric: the step's own checkpoint, uploaded to the trial's run
    assert moved.tags["checkpoint"] == f"runs:/{run_id}/checkpoints/step={step}.ckpt"
    assert mlflow.artifacts.download_artifacts(moved.tags["checkpoint"], tracking_uri=server.uri)
    for key in ("val/ari", "val/mbo"):  # the metric values of the promoted step
        at_step = [m.value for m in client.get_metric_history(run_id, key) if m.step == step]
        assert float(moved.tags[key]) == pytest.approx(at_step[-1]), key
    assert f"step {step}: val/mbo={float(moved.tags['val/mbo']):.4f}" in moved.description


def test_describe_a_version_in_one_line():
    from orchestrator.registry import describe

    chosen = {"trial_id": "t1", "step": 8, "metric": "val/mbo", "score": 0.41234,
              "metrics": {"val/ari": 0.5, "val/mbo": 0.4, "val/loss": None},
              "sampled": {"globals.NUM_SLOTS": 4, "model.loss_weights.loss_ss": 0.25,
                          "model.losses.loss_ss.temperature": 0.09305864360568289}}
    assert describe({"sweep": "s"}, chosen) == (
        "sweep s, trial t1, step 8: val/mbo=0.4123 (val/ari=0.5000); "
        "sampled: NUM_SLOTS=4, tau_ss=0.09306, w_ss=0.25")
    assert describe({"sweep": "s"}, {**chosen, "metrics": {}, "sampled": {}}) == (
        "sweep s, trial t1, step 8: val/mbo=0.4123")


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
    # under its trial in the MLflow UI, named after it; its folder too
    name = client.get_run(trial["mlflow_run_id"]).info.run_name
    assert reruns[0].data.tags[TAG_PARENT] == trial["mlflow_run_id"]
    assert reruns[0].info.run_name == f"rerun-of-{name}-1"
    assert (tmp_path / f"{name}-1" / "checkpoints" / "best.ckpt").is_file()
    assert f"folder {tmp_path / f'{name}-1'}" in proc.stdout
    for key in ("train/loss", "val/ari", "val/mbo"):
        a = {m.step: m.value for m in client.get_metric_history(trial["mlflow_run_id"], key)}
        b = {m.step: m.value for m in client.get_metric_history(new, key)}
        assert set(a) == set(b) and a, key
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-6), (key, step)


def test_a_rerun_is_numbered_among_the_reruns_of_its_trial(swept, tmp_path):
    from orchestrator.rerun import rerun_name

    server, _, record = swept
    client = MlflowClient(server.uri)
    experiment = record["mlflow"]["experiment_id"]
    trial = client.create_run(experiment, run_name="numbered/007")
    assert rerun_name(client, trial, tmp_path) == ("rerun-of-numbered/007-1",
                                                    tmp_path / "numbered_007-1")
    client.create_run(experiment, run_name="rerun-of-numbered/007-1",
                      tags={TAG_RERUN_OF: trial.info.run_id, TAG_PARENT: trial.info.run_id})
    assert rerun_name(client, trial, tmp_path) == ("rerun-of-numbered/007-2",
                                                    tmp_path / "numbered_007-2")
    (tmp_path / "numbered_007-2").mkdir()  # a folder left from elsewhere is not overwritten
    assert rerun_name(client, trial, tmp_path) == ("rerun-of-numbered/007-3",
                                                    tmp_path / "numbered_007-3")


def test_a_rerun_of_a_rerun_reads_the_sweep_run_of_its_trial(swept):
    from orchestrator.rerun import _sweep_params

    server, _, record = swept
    client = MlflowClient(server.uri)
    parent = record["mlflow"]["parent_run_id"]
    sweep = client.get_run(parent).data.params
    assert _sweep_params(client, client.get_run(record["best"]["mlflow_run_id"])) == sweep
    assert sweep["select.metric"] == "val/ari"
    trial = client.create_run(record["mlflow"]["experiment_id"], tags={TAG_PARENT: parent})
    first = client.create_run(trial.info.experiment_id, tags={
        TAG_RERUN_OF: trial.info.run_id, TAG_PARENT: trial.info.run_id})
    second = client.create_run(trial.info.experiment_id, tags={
        TAG_RERUN_OF: first.info.run_id, TAG_PARENT: first.info.run_id})
    assert _sweep_params(client, client.get_run(second.info.run_id)) == sweep


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


def test_evaluate_sweep_logs_downstream_numbers_and_promote_selects_by_them(swept, capsys):
    server, sweep_dir, record = swept
    argv = ["evaluate-sweep", str(sweep_dir), "--task", "linear_probe", "--label", "n_objects",
            "--tracking-uri", server.uri]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "promote by it: slotsweep promote" in out and "--metric downstream/linear_probe/" \
        "accuracy" in out
    summary = json.loads((sweep_dir / "downstream.json").read_text())["linear_probe"]
    client = MlflowClient(server.uri)
    for trial in record["trials"]:
        entry = summary["trials"][trial["trial_id"]]
        assert entry["step"] == trial["step"]
        history = client.get_metric_history(trial["mlflow_run_id"],
                                            "downstream/linear_probe/accuracy")
        assert [(m.step, m.value) for m in history] == [(trial["step"],
                                                         entry["metrics"]["accuracy"])]
        assert "downstream/linear_probe/backbone/accuracy" in \
            client.get_run(trial["mlflow_run_id"]).data.metrics
        features = Path(trial["run_dir"]) / "downstream" / "features"
        assert sorted(p.name for p in features.glob("*.pt")) == ["train.pt", "val.pt"]
    stamp = (Path(record["trials"][0]["run_dir"]) / "downstream/features/val.pt").stat().st_mtime
    assert main([*argv[:3], "4way_classification", "--label", "n_objects", "--tracking-uri",
                 server.uri]) in (0, 2)  # too few categories on the tiny data is one line
    capsys.readouterr()
    assert (Path(record["trials"][0]["run_dir"]) / "downstream/features/val.pt").stat() \
        .st_mtime == stamp  # the same checkpoint's features are extracted once
    best = max(record["trials"], key=lambda t: (summary["trials"][t["trial_id"]]["metrics"]
                                                ["accuracy"]))
    assert main(["promote", str(sweep_dir), "--metric", "downstream/linear_probe/accuracy",
                 "--name", "reg-downstream", "--tracking-uri", server.uri]) == 0
    assert f"trial {best['trial_id']} step {best['step']}" in capsys.readouterr().out
    from dashboards.cli import main as full_main

    assert full_main(["report", str(sweep_dir), "--no-masks", "--no-log", "--tracking-uri",
                      server.uri, "--out", str(sweep_dir / "downstream-report.html")]) == 0
    page = (sweep_dir / "downstream-report.html").read_text()
    assert '<th title="downstream/linear_probe/accuracy">probe accuracy</th>' in page
    assert "slotsweep evaluate-sweep" in page and "an untrained slot model" in page
