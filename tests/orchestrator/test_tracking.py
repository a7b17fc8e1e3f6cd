"""orchestrator.mlflow_server, .mlflow_runs and .trial_logger against one real MLflow server on
127.0.0.1 (started once per module)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow import MlflowClient

from core.config import flatten, load_config
from core.errors import SlotsweepError, one_line
from core.names import (
    MLFLOW_JOURNAL,
    TAG_FEATURE_CACHE,
    TAG_GIT,
    TAG_KIND,
    TAG_PARENT,
    TAG_SWEEP,
    TAG_SWEEP_KEY,
    TAG_TRIAL,
    TRACKING_URI_ENV,
    UNSENT_JSON,
)
from core.train import train
from orchestrator import mlflow_runs
from orchestrator.mlflow_runs import (
    ARTIFACT_CHECKPOINT,
    ARTIFACT_CONFIG,
    ARTIFACT_VISUALS,
    client_for,
    find_trial_run,
    finish_run,
    get_or_create_experiment,
    get_or_create_sweep_run,
    get_or_create_trial_run,
    log_params,
    runs_of_sweep,
)
from orchestrator.mlflow_sender import ArtifactUploader, journal_pending, send_saved
from orchestrator.mlflow_server import LocalServer, check_tracking_uri, resolve_tracking_uri
from orchestrator.trial_logger import TrialLogger

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def client(server):
    return client_for(server.uri)


@pytest.fixture()
def experiment(client, request):
    return get_or_create_experiment(client, request.node.name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _group_alive(pgid: int) -> bool:
    """A live (not zombie) process in process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_server_answers_and_uri_checks(server):
    assert server.uri.startswith("http://127.0.0.1:") and server.uri.endswith(f":{server.port}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{server.uri}/health", timeout=5) as response:
        assert response.status == 200
    assert (server.root / "mlflow.db").is_file() and (server.root / "server.log").is_file()
    check_tracking_uri(server.uri)
    check_tracking_uri(server.uri + "/")
    check_tracking_uri(f"sqlite:///{server.root / 'other.db'}")  # absolute sqlite is allowed


@pytest.mark.parametrize(("uri", "words"), [
    ("http://127.0.0.1:{port}", "unreachable"),
    ("sqlite:///relative.db", "relative"),
    ("file:./mlruns", "file store"),
    ("./mlruns", "file store"),
    ("ftp://example.org/x", "unsupported scheme"),
])  # fmt: skip
def test_check_tracking_uri_fails_one_line(uri, words):
    uri = uri.format(port=_free_port())  # a port nobody listens on
    with pytest.raises(SlotsweepError) as info:
        check_tracking_uri(uri)
    message = str(info.value)
    assert words in message and "\n" not in message and uri in message


def test_resolve_tracking_uri(monkeypatch):
    from mlflow.environment_variables import MLFLOW_TRACKING_URI

    assert MLFLOW_TRACKING_URI.name == TRACKING_URI_ENV  # the variable MLflow itself reads
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    assert resolve_tracking_uri(None) is None
    monkeypatch.setenv(TRACKING_URI_ENV, "http://env:5000")
    assert resolve_tracking_uri(None) == "http://env:5000"
    assert resolve_tracking_uri("http://cfg:5000") == "http://cfg:5000"


def test_deleted_experiment_is_an_error(client):
    client.delete_experiment(get_or_create_experiment(client, "gone"))
    with pytest.raises(SlotsweepError, match="restore"):
        get_or_create_experiment(client, "gone")


def test_sweep_and_trial_runs_are_found_again(client, experiment, monkeypatch):
    monkeypatch.setattr(mlflow_runs, "git_commit", lambda: "a" * 40)
    sweep = get_or_create_sweep_run(client, experiment, "key-1", "my sweep", {"extra": "x"})
    tags = client.get_run(sweep).data.tags
    assert tags[TAG_KIND] == "sweep" and tags[TAG_SWEEP] == "my sweep"
    assert tags[TAG_SWEEP_KEY] == "key-1" and tags[TAG_GIT] == "a" * 40 and tags["extra"] == "x"
    finish_run(client, sweep, "KILLED")
    assert get_or_create_sweep_run(client, experiment, "key-1", "my sweep") == sweep
    assert client.get_run(sweep).info.status == "RUNNING"
    assert get_or_create_sweep_run(client, experiment, "key-2", "my sweep") != sweep

    first = get_or_create_trial_run(client, experiment, sweep, "t_00000", "trial 0")
    other = get_or_create_trial_run(client, experiment, sweep, "t_00001", "trial 1")
    finish_run(client, first, "FAILED")
    # Tuner.restore: a new process asks again for the same trial and gets the same run
    again = get_or_create_trial_run(client, experiment, sweep, "t_00000", "trial 0")
    assert again == first != other
    assert find_trial_run(client, experiment, sweep, "t_00001") == other
    assert find_trial_run(client, experiment, sweep, "t_00002") is None
    assert client.get_run(first).info.status == "RUNNING"
    tags = client.get_run(first).data.tags
    assert tags[TAG_PARENT] == sweep and tags[TAG_TRIAL] == "t_00000" and tags[TAG_KIND] == "trial"
    children = runs_of_sweep(client, experiment, sweep)
    assert [r.info.run_id for r in children] == [first, other]
    with pytest.raises(SlotsweepError):
        finish_run(client, first, "DONE")


def test_log_params_resume_change_and_limits(client, experiment):
    run = client.create_run(experiment).info.run_id
    params = {"a": 1, "lr": 0.001, "dims": [64, 64], "nested": {"b": True}, "long": "x" * 7000,
              **{f"p{i}": i for i in range(150)}}  # more than one batch of 100
    assert log_params(client, run, params) == []
    assert log_params(client, run, params) == []  # a resumed trial logs the same again
    assert log_params(client, run, {**params, "lr": 0.01}) == ["lr"]
    data = client.get_run(run).data
    assert data.params["lr"] == "0.001" and data.tags["param_changed.lr"] == "0.01"
    assert data.params["dims"] == "[64, 64]" and data.params["nested.b"] == "True"
    assert len(data.params["long"]) == 6000 and data.params["long"].endswith("...")
    assert data.params["p149"] == "149"


def test_trial_logger_logs_a_real_training_run(client, experiment, server, tmp_path,
                                               tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    cfg = load_config("tiny", ["trainer.max_steps=2"])
    run = client.create_run(experiment).info.run_id
    logger = TrialLogger(server.uri, run, params=flatten(cfg))
    train(cfg, callbacks=[logger], run_dir=tmp_path / "run", progress_bar=False)
    data = client.get_run(run).data
    assert data.params["globals.NUM_SLOTS"] == "3"
    assert [m.step for m in client.get_metric_history(run, "train/loss")] == [1, 2]
    for key in ("val/ari", "val/mbo"):
        history = client.get_metric_history(run, key)
        assert [m.step for m in history] == [2] and -1.0 <= history[0].value <= 1.0
    assert all(key.startswith(("train/", "val/")) for key in data.metrics)
    listed = {a.path for folder in (ARTIFACT_CONFIG, ARTIFACT_VISUALS, ARTIFACT_CHECKPOINT)
              for a in client.list_artifacts(run, folder)}
    assert listed == {"config/config.yaml", "visualizations/step=2.png",
                      "checkpoints/best.ckpt"}
    # the slot pictures also as an image series (MLflow's Image grid), labelled and large
    images = [a.path for a in client.list_artifacts(run, "images")]
    assert any(p.startswith("images/slots+step+2+") and p.endswith(".png") for p in images), images
    picture = client.download_artifacts(run, "visualizations/step=2.png", str(tmp_path / "dl"))
    from PIL import Image

    assert Image.open(picture).width >= 2 * 128  # two frames of at least 128 px, plus labels
    # a restored trial (fresh callback, same run) does not send the visualisations again
    again = ArtifactUploader(run)
    sent = []
    monkeypatch.setattr(MlflowClient, "log_artifact", lambda self, *a: sent.append(a[1]))
    again.upload(MlflowClient(server.uri), tmp_path / "run", checkpoint=False)
    assert sent == [str(tmp_path / "run" / "config.yaml")]
    monkeypatch.undo()
    monkeypatch.setenv("SLOTSWEEP_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    # resumed from step 2 to 4 (a new process, same run): every step logged once
    more = load_config("tiny", ["trainer.max_steps=4"])
    ckpt = tmp_path / "run" / "checkpoints" / "step=2.ckpt"
    train(more, callbacks=[TrialLogger(server.uri, run)], run_dir=tmp_path / "run",
          continue_from=ckpt, progress_bar=False)
    assert [m.step for m in client.get_metric_history(run, "train/loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run, "val/ari")] == [2, 4]


class _Broken:
    """A client whose calls fail while ``down`` is set; records what arrived."""

    def __init__(self, down: bool = False) -> None:
        self.down, self.calls, self.logged = down, 0, []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    def _call(self) -> None:
        self.calls += 1
        if self.down:
            time.sleep(0.05)
            raise ConnectionError("server went away\nsecond line")

    def get_run(self, run_id):
        self._call()
        return SimpleNamespace(data=SimpleNamespace(params=dict(self.params)))

    def set_tag(self, run_id, key, value) -> None:
        self._call()
        self.tags[key] = value

    def list_artifacts(self, *args):
        self._call()
        return []

    def log_artifact(self, *args) -> None:
        self._call()

    def log_batch(self, run_id, metrics=(), params=(), tags=()) -> None:
        self._call()
        self.logged += [(m.key, m.step) for m in metrics]
        self.params.update({p.key: p.value for p in params})
        self.tags.update({t.key: t.value for t in tags})


def _trainer(rank0: bool = True, step: int = 4, root: str = ".") -> SimpleNamespace:
    metrics = {"train/loss": torch.tensor(1.5), "val/ari": torch.tensor(0.5)}
    return SimpleNamespace(is_global_zero=rank0, global_step=step, log_every_n_steps=2,
                           max_steps=100, callback_metrics=metrics, sanity_checking=False,
                           default_root_dir=root)


def test_a_dead_server_never_blocks_training_and_values_arrive_when_it_is_back(capsys):
    logger = TrialLogger("http://127.0.0.1:1", "run")
    logger.sender._client = client = _Broken(down=True)
    logger.sender.max_delay_s = 0.2
    start = time.monotonic()
    for step in (2, 4, 6):
        logger.on_train_batch_end(_trainer(step=step), None, None, None, 0)
    assert time.monotonic() - start < 0.05  # the training thread only queues
    assert not logger.sender.wait_idle(1.0) and client.calls >= 2  # retried, in order
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "server went away" in err[0] and "training continues" in err[0]
    client.down = False  # the server is back
    assert logger.sender.wait_idle(5.0)
    assert client.logged == [("train/loss", 2), ("train/loss", 4), ("train/loss", 6)]
    assert "answers again" in capsys.readouterr().err


def test_values_unsent_at_the_end_are_kept_then_sent_by_the_next_process(tmp_path, capsys):
    logger = TrialLogger("http://127.0.0.1:1", "run", params={"lr": 0.001})
    logger.flush_s = 0.3
    logger.sender._client = _Broken(down=True)
    logger.on_fit_start(_trainer(root=str(tmp_path)), SimpleNamespace())
    for step in (2, 4):
        logger.on_train_batch_end(_trainer(step=step), None, None, None, 0)
    logger.on_validation_end(_trainer(step=4), None)
    logger.finish(tmp_path)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "MLflow run run misses 3 metric values (steps 2-4)" in err and str(tmp_path) in err
    kept = json.loads((tmp_path / UNSENT_JSON).read_text())
    assert sorted((m["key"], m["step"]) for m in kept["metrics"]) == [
        ("train/loss", 2), ("train/loss", 4), ("val/ari", 4)]
    assert "artifact upload" in kept["other"]
    assert kept["params"] == {"lr": 0.001} and kept["tags"] == {TAG_FEATURE_CACHE: "none"}
    back = _Broken()
    assert send_saved(back, tmp_path) == "artifact upload"  # no uploader given: still missing
    assert sorted(back.logged) == [("train/loss", 2), ("train/loss", 4), ("val/ari", 4)]
    assert back.params == {"lr": "0.001"} and back.tags == {TAG_FEATURE_CACHE: "none"}
    uploads = []
    assert send_saved(back, tmp_path, lambda: uploads.append(1)) is None and uploads == [1]
    assert len(back.logged) == 3 and not (tmp_path / UNSENT_JSON).exists()  # sent once


def test_one_line_is_the_first_line_or_the_type():
    assert one_line(ConnectionError("server went away\nsecond line")) == "server went away"
    assert one_line(ValueError("  ")) == "ValueError" and len(one_line(OSError("x" * 999))) == 300


def test_the_server_module_starts_without_mlflow():
    """``slotsweep ui`` and the URI checks need no MLflow import: the server is a subprocess."""
    code = ("import sys, orchestrator.mlflow_server\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_trial_logger_is_silent_on_other_ranks_and_between_log_steps():
    logger = TrialLogger("http://127.0.0.1:1", "run")
    logger.sender._client = spy = _Broken()
    logger.on_train_batch_end(_trainer(rank0=False), None, None, None, 0)
    logger.on_validation_end(_trainer(rank0=False), None)
    logger.on_train_batch_end(_trainer(step=3), None, None, None, 0)  # log_every_n_steps=2
    assert logger.sender.wait_idle(1.0) and spy.calls == 0


def test_server_start_failures_are_one_line(server, tmp_path):
    with pytest.raises(SlotsweepError, match="not free"):  # another server answers there
        LocalServer.start(tmp_path / "taken", port=server.port)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "mlflow.db").write_text("not a database")
    with pytest.raises(SlotsweepError) as info:
        LocalServer.start(tmp_path / "bad", timeout=60)
    message = str(info.value)
    assert "\n" not in message and "exited" in message and "file is not a database" in message


def test_server_dies_with_the_process_that_started_it(tmp_path):
    script = ("import sys, time\nfrom pathlib import Path\n"
              "from orchestrator.mlflow_server import LocalServer\n"
              "server = LocalServer.start(Path(sys.argv[1]))\n"
              "Path(sys.argv[2]).write_text(str(server.pid))\ntime.sleep(300)\n")
    pid_file = tmp_path / "pid"
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "srv"), str(pid_file)],
                              cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), "the server did not start"
        server_pid = int(pid_file.read_text())
        assert _group_alive(server_pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while _group_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _group_alive(server_pid):
        os.killpg(server_pid, signal.SIGKILL)
        pytest.fail("the MLflow server outlived the process that started it")


def test_values_queued_by_a_killed_process_are_sent_by_the_next_one(tmp_path):
    """The journal: a process killed with values still queued (never closed) leaves them on
    disk; the run's next process sends them, skipping the steps the run already holds."""
    first = TrialLogger("http://127.0.0.1:1", "run")
    first.sender._client = _Broken(down=True)
    first.on_fit_start(_trainer(root=str(tmp_path)), SimpleNamespace())
    for step in (2, 4, 6):  # log_every_n_steps=2
        first.on_train_batch_end(_trainer(step=step), None, None, None, 0)
    # killed here: no finish()
    assert sorted(m.step for m in journal_pending(tmp_path / MLFLOW_JOURNAL)) == [2, 4, 6]
    second = TrialLogger("http://127.0.0.1:1", "run")
    second.sender._client = client = _Broken()
    client.logged = [("train/loss", 2)]  # step 2 had reached the server
    client.get_metric_history = lambda run, key: [
        SimpleNamespace(step=s) for k, s in client.logged if k == key]
    # resumed from step 6, whose values are also among the lost ones: sent once
    second.on_load_checkpoint(None, None, {"slotsweep_metrics": {
        "step": 6, "metrics": {"train/loss": 1.5}}})
    second.on_fit_start(_trainer(root=str(tmp_path)), SimpleNamespace())
    second.on_train_batch_end(_trainer(step=8), None, None, None, 0)
    second.finish(tmp_path)
    assert sorted(client.logged) == [("train/loss", s) for s in (2, 4, 6, 8)]
    assert not (tmp_path / MLFLOW_JOURNAL).exists()
