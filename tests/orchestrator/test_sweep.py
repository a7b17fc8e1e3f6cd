"""Sweeps against real parts: a local Ray instance and a real MLflow server on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow_runs import sweep_runs

from core.names import TAG_FEATURE_CACHE, TAG_PARENT, TAG_TRIAL
from orchestrator.cli import main
from orchestrator.mlflow_server import LocalServer

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(base / "cache"))
    monkeypatch.setenv("SLOTSWEEP_MLFLOW_DIR", str(base / "embedded-mlflow"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def test_sweep_of_four_trials_two_at_a_time(tmp_path, server, capsys):
    argv = ["sweep", str(QUICKSTART), f"storage={tmp_path}", "name=e2e",
            f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=e2e"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 finished, 0 running, 0 pending of 4 planned" in out and "best: trial" in out
    # the first trial built the feature cache (under a lock); every trial read it
    cache_line = next(line for line in out.splitlines() if line.startswith("feature cache: "))
    assert "(read by 4 of 4 trials" in cache_line, cache_line
    cache_dir = cache_line.removeprefix("feature cache: ").split(" (")[0]
    assert (Path(cache_dir) / "manifest.json").is_file()
    record = json.loads((tmp_path / "e2e" / "best.json").read_text())
    assert [t["state"] for t in record["trials"]] == ["DONE"] * 4
    client = MlflowClient(server.uri)
    parents, children = sweep_runs(server.uri, "e2e")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags[TAG_PARENT] for c in children} == {parents[0].info.run_id}
    assert record["mlflow"]["parent_run_id"] == parents[0].info.run_id
    # MLflow 3's UI opens the experiment in its model-training view, not GenAI traces
    assert client.get_experiment_by_name("e2e").tags["mlflow.experimentKind"] == (
        "custom_model_development")
    note = parents[0].data.tags["mlflow.note.content"]  # the sweep run's description
    best = record["best"]
    assert f"Best trial: [{best['trial_id']}](#/experiments/" in note
    assert f"runs/{best['mlflow_run_id']}?workflowType=machine_learning)" in note
    assert "| trial | NUM_SLOTS | tau_ss | w_ss |" in note
    assert sum(line.startswith("| ") for line in note.splitlines()) == 1 + 4  # header + 4 trials
    by_trial = {c.data.tags[TAG_TRIAL]: c for c in children}
    assert set(by_trial) == {t["trial_id"] for t in record["trials"]}
    for trial in record["trials"]:
        run = by_trial[trial["trial_id"]]
        assert run.info.run_id == trial["mlflow_run_id"] and run.info.status == "FINISHED"
        assert run.data.tags[TAG_FEATURE_CACHE] == cache_dir
        # each sampled value once, under its short name; the tag maps short names to keys
        assert run.data.params["search/NUM_SLOTS"] == str(trial["sampled"]["globals.NUM_SLOTS"])
        assert "search/w_ss" in run.data.params and "search/tau_ss" in run.data.params
        assert not {"globals.NUM_SLOTS", "model.loss_weights.loss_ss"} & set(run.data.params)
        assert not any(k.startswith("sampled.") for k in run.data.params)
        assert "w_ss=model.loss_weights.loss_ss" in run.data.tags["slotsweep.searched"]
        # its best values (not only the last), their step, and whether it is the sweep's best
        for key in ("val/ari", "val/mbo"):
            best_history = client.get_metric_history(run.info.run_id, f"best/{key}")
            assert [(m.step, m.value) for m in best_history] == [
                (trial["step"], pytest.approx(trial["metrics"][key]))]
        assert run.data.tags["slotsweep.best_step"] == str(trial["step"])
        is_best = trial["trial_id"] == record["best"]["trial_id"]
        assert run.data.tags["slotsweep.sweep_best"] == str(is_best).lower()
        assert _steps(client, run.info.run_id, "val/ari") == [4, 8]
        assert _steps(client, run.info.run_id, "val/mbo") == [4, 8]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config", "checkpoints", "visualizations"} <= artifacts
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
            "checkpoints/best.ckpt"]
        # the trial's best step in best.json is the MLflow history's best (tie: val/mbo)
        ari = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/ari")}
        mbo = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/mbo")}
        best_step = max(ari, key=lambda s: (ari[s], mbo[s]))
        assert trial["step"] == best_step
        assert trial["metrics"]["val/ari"] == pytest.approx(ari[best_step])
    best = record["best"]
    assert best["metrics"]["val/ari"] == max(t["metrics"]["val/ari"] for t in record["trials"])
    assert Path(best["checkpoint"]).is_file()
    assert parents[0].data.tags["best_trial"] == best["trial_id"]


def test_a_failing_trial_is_retried_and_a_nan_trial_fails_alone(tmp_path, server, monkeypatch,
                                                                  capsys):
    monkeypatch.setenv("SLOTSWEEP_INJECT_FAULT", "raise:1:5,nan:2:3")
    argv = ["sweep", str(QUICKSTART), f"storage={tmp_path}", "name=faults",
            f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=faults"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "faults" / "best.json").read_text())
    states = {t["trial_id"].rsplit("_", 1)[1]: t for t in record["trials"]}
    assert states["00001"]["state"] == "DONE"  # raised once at step 5, resumed from step 4
    assert (Path(states["00001"]["run_dir"]) / ".fault-raised").is_file()
    assert states["00002"]["state"] == "DIVERGED"
    assert "became nan at step 3" in states["00002"]["error"]
    assert states["00000"]["state"] == states["00003"]["state"] == "DONE"
    client = MlflowClient(server.uri)
    _, children = sweep_runs(server.uri, "faults")
    assert len(children) == 4  # the retry reused its run
    by_trial = {c.data.tags[TAG_TRIAL]: c for c in children}
    retried = by_trial[states["00001"]["trial_id"]]
    assert _steps(client, retried.info.run_id, "val/ari") == [4, 8]
    diverged = by_trial[states["00002"]["trial_id"]]
    assert diverged.info.status == "FAILED"
    assert "became nan" in diverged.data.tags["slotsweep.error"]
    assert "diverged: loss" in capsys.readouterr().out


def test_every_trial_failing_exits_non_zero_with_a_summary(tmp_path, server, monkeypatch, capsys):
    monkeypatch.setenv("SLOTSWEEP_INJECT_FAULT", "nan:0:1,nan:1:1")
    argv = ["sweep", str(QUICKSTART), f"storage={tmp_path}", "name=allfail", "trials=2",
            f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=allfail"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "all 2 trials failed" in captured.err
    assert captured.out.count("DIVERGED") >= 2


def _sweep_cmd(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", str(QUICKSTART),
            f"storage={tmp_path / 'storage'}", "name=killed", "trainer.max_steps=12",
            *extra]


def test_kill_the_driver_then_resume(tmp_path):
    env = {**os.environ, "SLOTSWEEP_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "SLOTSWEEP_CACHE": os.environ["SLOTSWEEP_CACHE"]}
    log = (tmp_path / "first.log").open("w")
    driver = subprocess.Popen(_sweep_cmd(tmp_path), stdout=log, stderr=subprocess.STDOUT,
                              env=env, cwd=tmp_path)
    trials = tmp_path / "storage" / "killed" / "trials"
    deadline = time.monotonic() + 240
    finished_before: dict[str, float] = {}
    while time.monotonic() < deadline:  # kill once one trial finished and another is midway
        done = {p.parent.parent.name: p.stat().st_mtime
                for p in trials.glob("*/checkpoints/step=12.ckpt")}
        midway = [p for p in trials.glob("*/checkpoints/step=4.ckpt")
                  if p.parent.parent.name not in done]
        if done and midway:
            finished_before = done
            break
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    assert finished_before, "no trial finished in time"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    time.sleep(3)
    resumed = subprocess.run([*_sweep_cmd(tmp_path), "--resume"], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    record = json.loads((tmp_path / "storage" / "killed" / "best.json").read_text())
    assert len(record["trials"]) == 4
    assert all(t["state"] == "DONE" for t in record["trials"]), record["trials"]
    for trial_id, mtime in finished_before.items():  # finished trials were not run again
        assert (trials / trial_id / "checkpoints" / "step=12.ckpt").stat().st_mtime == mtime
    uri = record["mlflow"]["tracking_uri"]
    with LocalServer.start(tmp_path / "mlflow") as srv:
        parents, children = sweep_runs(srv.uri, "quickstart")
        client = MlflowClient(srv.uri)
        mine = [c for c in children
                if c.data.tags[TAG_PARENT] == record["mlflow"]["parent_run_id"]]
        assert len(parents) == 1 and len(mine) == 4, uri
        assert sorted(c.data.tags[TAG_TRIAL] for c in mine) == sorted(
            t["trial_id"] for t in record["trials"])
        for run in mine:
            assert _steps(client, run.info.run_id, "val/ari") == [4, 8, 12]
            assert run.info.status == "FINISHED"


# ------------------------------------------------------------- nothing starts on bad input


def _one_line_error(argv: list[str], capsys) -> str:
    import ray

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slotsweep: error: ") and "\n" not in err, err
    assert not ray.is_initialized()
    return err


def test_bad_sweeps_fail_before_anything_starts(tmp_path, capsys):
    base = ["sweep", str(QUICKSTART), f"storage={tmp_path}"]
    err = _one_line_error([*base, "search.globals.NUM_SLOT={choice: [3, 4]}"], capsys)
    assert "NUM_SLOT" in err and "did you mean" in err
    err = _one_line_error([*base, "select.metric=val/arii"], capsys)
    assert "val/arii" in err and "val/ari" in err
    err = _one_line_error([*base, "algorithm.name=optuna", "search.grouper.n_iters={grid: [1, 2]}"],
                          capsys)
    assert "grid" in err and "optuna" in err
    err = _one_line_error([*base, "resources.gpus_per_trial=1"], capsys)
    assert "gpus_per_trial" in err and "GPU" in err
    port = _free_port()
    err = _one_line_error([*base, f"mlflow.tracking_uri=http://127.0.0.1:{port}"], capsys)
    assert "unreachable" in err and str(port) in err
    assert not any(tmp_path.iterdir())  # no sweep folder, no trial


def test_resume_without_a_sweep_and_rerun_without_resume(tmp_path, server, capsys):
    base = ["sweep", str(QUICKSTART), f"storage={tmp_path}", "name=nothing",
            f"mlflow.tracking_uri={server.uri}"]
    err = _one_line_error([*base, "--resume"], capsys)
    assert "no sweep to resume" in err


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ddp_trial_runs_on_two_gloo_workers(tmp_path, server):
    """workers > 1: Ray Train's TorchTrainer with ray.train.lightning inside the Tune trial."""
    argv = ["sweep", str(QUICKSTART), f"storage={tmp_path}", "name=ddp", "trials=1",
            "concurrency=1", "resources.workers=2", f"mlflow.tracking_uri={server.uri}",
            "mlflow.experiment=ddp"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "ddp" / "best.json").read_text())
    (trial,) = record["trials"]
    assert trial["state"] == "DONE" and trial["step"] in (4, 8) and trial["checkpoint"]
    client = MlflowClient(server.uri)
    run = client.get_run(trial["mlflow_run_id"])  # rank 0 alone logged, into one run
    assert run.info.status == "FINISHED"
    assert _steps(client, run.info.run_id, "val/ari") == [4, 8]
    _, children = sweep_runs(server.uri, "ddp")
    assert len(children) == 1


def test_the_searcher_seed_and_trial_seeds_are_recorded(tmp_path, server):
    argv = ["sweep", str(QUICKSTART), f"storage={tmp_path}", "name=seeds", "trials=2",
            "trainer.max_steps=4", f"mlflow.tracking_uri={server.uri}", "mlflow.experiment=seeds"]
    assert main(argv) == 0
    parents, children = sweep_runs(server.uri, "seeds")
    assert parents[0].data.params["algorithm.seed"] == "0"
    assert parents[0].data.params["algorithm.name"] == "random"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1"]
    first = json.loads((tmp_path / "seeds" / "best.json").read_text())["trials"]
    assert main([*argv[:2], f"storage={tmp_path / 'again'}", *argv[3:]]) == 0
    again = json.loads((tmp_path / "again" / "seeds" / "best.json").read_text())["trials"]
    key = lambda t: t["index"]  # noqa: E731
    assert [t["sampled"] for t in sorted(first, key=key)] == [
        t["sampled"] for t in sorted(again, key=key)]  # same seed, same trials


def test_the_final_table_names_searched_keys_as_mlflow_and_the_report_do():
    import io

    from orchestrator.results import print_summary
    from orchestrator.spec import load_sweep

    out = io.StringIO()
    print_summary(load_sweep(QUICKSTART), [], None, out)
    header = next(line for line in out.getvalue().splitlines() if line.startswith("trial"))
    assert header.split()[:7] == ["trial", "state", "best", "step", "NUM_SLOTS", "tau_ss", "w_ss"]
    assert "at each trial's best step by max val/ari" in out.getvalue()
