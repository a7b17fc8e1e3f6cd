"""``slotsweep submit`` against real parts on loopback: a Ray head started by ``ray start --head``
(dashboard + Jobs API, token authentication on) and a real MLflow server.

The head runs in its own session and is stopped by its process id (SIGTERM to the blocking
``ray start``, then SIGKILL to whatever is left in its session): ``ray stop --force`` would end
every Ray process of this user on the machine, other clusters and sweeps included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow_runs import sweep_runs

from core.names import TAG_PARENT
from orchestrator import submit as sub
from orchestrator.cli import main
from orchestrator.mlflow_server import _die_with_parent, _free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the venv's bin: `ray`, and the job's `python`
QUICKSTART = "sweeps/quickstart.yaml"
RUN_SWEEP = ROOT / "docker" / "run_sweep.py"
REJECTED = ("rejected the request (token authentication): run `ray get-auth-token` on the head "
            "node and pass --token or set RAY_AUTH_TOKEN")


@dataclass
class Head:
    address: str
    token: str
    log: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def job_ids(self) -> set[str]:
        return {job.submission_id for job in self.client().list_jobs()}


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def _jobs_api_ready(address: str, token: str) -> bool:
    request = urllib.request.Request(f"{address}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen, head: Head | None) -> None:
    if head is not None:  # job drivers run in sessions of their own: stop them through Ray
        try:
            client = head.client()
            for job in client.list_jobs():
                if not job.status.is_terminal():
                    client.stop_job(job.submission_id)
        except Exception as exc:
            print(f"could not stop jobs: {exc}", file=sys.stderr)
    process.send_signal(signal.SIGTERM)  # `ray start --block` drains, then ends its processes
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for pid in _session_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node Ray cluster, 2 CPUs, dashboard on 127.0.0.1, token authentication on."""
    base = tmp_path_factory.mktemp("head")
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Unix socket paths
    token_home = base / "token-home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN",
                        "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI")}
    # Ray's own generator, in a HOME of its own: the user's ~/.ray/auth_token is left alone
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True,
                   env={**env, "HOME": str(token_home)}, capture_output=True, timeout=60)
    token_file = token_home / ".ray" / "auth_token"
    ports = [_free_port() for _ in range(4)]
    env.update({
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",  # explicit: `ray start` alone turns it on only if a token exists
        "RAY_AUTH_TOKEN_PATH": str(token_file),  # the head, its jobs and their trials read it
        "SLOTSWEEP_CACHE": str(base / "cache"),
        "SLOTSWEEP_MLFLOW_DIR": str(base / "embedded-mlflow"),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(ports[0]), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(ports[1]), "--ray-client-server-port", str(ports[2]),
           "--dashboard-agent-listen-port", str(ports[3]), "--num-cpus", "2",
           "--include-dashboard=true", "--temp-dir", str(temp_dir), "--disable-usage-stats"]
    log = base / "ray-start.log"
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   cwd=base, stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=_die_with_parent())
    running = None
    try:
        running = Head(f"http://127.0.0.1:{ports[1]}", token_file.read_text().strip(), log)
        deadline = time.monotonic() + 120
        while not _jobs_api_ready(running.address, running.token):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no Jobs API after 120 s:\n" + log.read_text()
            time.sleep(0.5)
        yield running
    finally:
        _stop(process, running)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    """No token, cluster or MLflow server leaks in from the user's environment or HOME."""
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("slotsweep: error: "), err
    return err[len("slotsweep: error: "):]


def test_a_submitted_sweep_runs_on_the_cluster_and_logs_to_mlflow(head, server, tmp_path,
                                                                    monkeypatch, capsys):
    # the right token, found where Ray keeps it on the head (~/.ray/auth_token): no --token
    (tmp_path / "home" / ".ray").mkdir()
    (tmp_path / "home" / ".ray" / "auth_token").write_text(head.token + "\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)  # reaches the job only as env_vars
    before = head.job_ids()
    storage = tmp_path / "storage"
    argv = ["submit", QUICKSTART, "--address", head.address, "trials=2", "--follow",
            "concurrency=2", "trainer.max_steps=4", "name=submitted", f"storage={storage}"]
    assert main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    (job_id,) = head.job_ids() - before
    client = head.client()
    info = client.get_job_info(job_id)
    assert str(info.status) == "SUCCEEDED"
    assert info.entrypoint == ("python -m dashboards.cli sweep sweeps/quickstart.yaml trials=2 "
                               "concurrency=2 trainer.max_steps=4 name=submitted "
                               f"storage={storage}")
    assert info.runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": server.uri}
    assert f"as Ray job {job_id}" in out
    assert f"ray job logs --follow {job_id} --address {head.address}" in out
    assert "2 finished, 0 running, 0 pending of 2 planned" in out and "best: trial" in out
    assert (storage / "submitted" / "best.json").is_file()  # written by the job on the head
    assert (storage / "submitted" / "report.html").is_file()  # and its report
    parents, children = sweep_runs(server.uri, "quickstart")
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags[TAG_PARENT] for c in children} == {parents[0].info.run_id}
    assert {r.info.status for r in parents + children} == {"FINISHED"}


def test_following_a_job_that_fails_on_the_cluster_exits_1(head, server, tmp_path, capsys):
    # valid here, but the one-node cluster has 2 CPUs: the sweep on the head exits 2
    argv = ["submit", QUICKSTART, "--address", head.address, "--token", head.token, "--follow",
            "--mlflow-uri", server.uri, "resources.cpus_per_trial=3", "name=toobig",
            f"storage={tmp_path}"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "slotsweep: error: resources.cpus_per_trial=3 but the cluster has 2 CPUs" in captured.out
    assert "RAY_AUTH_TOKEN=<token> ray job logs --follow" in captured.out  # never the token
    assert head.token not in captured.out + captured.err
    job_id = captured.out.split("as Ray job ", 1)[1].split()[0]
    assert captured.err.strip().splitlines()[-1] == (
        f"slotsweep: job {job_id} FAILED: Job entrypoint command failed with exit code 2")


@pytest.mark.parametrize("how", ["wrong --token", "wrong RAY_AUTH_TOKEN", "no token"])
def test_a_wrong_or_missing_token_is_rejected_and_nothing_is_submitted(head, server, how,
                                                                       monkeypatch, capsys):
    argv = ["submit", QUICKSTART, "--address", head.address, "--mlflow-uri", server.uri]
    if how == "wrong --token":
        argv += ["--token", "not-the-token"]
    elif how == "wrong RAY_AUTH_TOKEN":
        monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    before = head.job_ids()
    assert main(argv) == 2
    assert _one_error_line(capsys) == f"Ray at {head.address} {REJECTED}"
    assert head.job_ids() == before


def test_an_unreachable_address_is_one_line(server, capsys):
    address = f"http://127.0.0.1:{_free_port()}"
    assert main(["submit", QUICKSTART, "--address", address, "--mlflow-uri", server.uri]) == 2
    assert _one_error_line(capsys) == (
        f"Ray at {address} is unreachable (Connection refused): check --address "
        "(http://HEAD:8265) and that the dashboard is up")


@pytest.mark.parametrize("address", ["ray://127.0.0.1:10001", "http://", "http://head:port",
                                     "s3://bucket"])
def test_a_malformed_address_is_one_line(server, address, capsys):
    assert main(["submit", QUICKSTART, "--address", address, "--mlflow-uri", server.uri]) == 2
    assert f"--address {address} " in _one_error_line(capsys)


def test_no_address_at_all_is_one_line(server, capsys):
    assert main(["submit", QUICKSTART, "--mlflow-uri", server.uri]) == 2
    assert "pass --address http://HEAD:8265" in _one_error_line(capsys)


def test_no_mlflow_uri_is_one_line_and_nothing_is_submitted(head, capsys):
    before = head.job_ids()
    assert main(["submit", QUICKSTART, "--address", head.address, f"--token={head.token}"]) == 2
    assert _one_error_line(capsys) == sub.NO_MLFLOW
    assert head.job_ids() == before


def test_an_unreachable_mlflow_server_is_one_line(head, capsys):
    uri = f"http://127.0.0.1:{_free_port()}"
    assert main(["submit", QUICKSTART, "--address", head.address, "--mlflow-uri", uri]) == 2
    assert _one_error_line(capsys).startswith(f"MLflow tracking server {uri} is unreachable")


@pytest.mark.parametrize(("argv", "message"), [
    (["sweeps/missing.yaml"], "sweep file sweeps/missing.yaml does not exist"),
    ([QUICKSTART, "trials=0"], "trials must be >= 1"),
    ([QUICKSTART, "nosuchkey=1"], "names neither a sweep field nor a config key"),
])
def test_a_bad_sweep_is_one_line_and_nothing_is_submitted(head, server, argv, message, capsys):
    before = head.job_ids()
    full = ["submit", *argv, "--address", head.address, "--mlflow-uri", server.uri,
            "--token", head.token]
    assert main(full) == 2
    assert message in _one_error_line(capsys)
    assert head.job_ids() == before


def test_a_sweep_file_outside_the_project_is_one_line(server, tmp_path, capsys):
    outside = tmp_path / "mine.yaml"
    shutil.copy(ROOT / QUICKSTART, outside)
    assert main(["submit", str(outside), "--address", "http://127.0.0.1:1",
                 "--mlflow-uri", server.uri]) == 2
    assert "is outside the project" in _one_error_line(capsys)


def test_the_token_is_found_where_ray_looks_for_it(tmp_path, monkeypatch):
    assert sub.resolve_token() == (None, "none")
    default = tmp_path / "home" / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("from-default\n")
    assert sub.resolve_token() == ("from-default", str(default))
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert sub.resolve_token() == ("from-path", "RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert sub.resolve_token() == ("from-env", "RAY_AUTH_TOKEN")
    assert sub.resolve_token("given") == ("given", "--token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(sub.SlotsweepError, match=r"RAY_AUTH_TOKEN_PATH=.* cannot be read"):
        sub.resolve_token()


def test_the_entrypoint_quotes_overrides():
    assert sub.entrypoint("sweeps/a b.yaml", ["search.x={choice: [1, 2]}"]) == (
        "python -m dashboards.cli sweep 'sweeps/a b.yaml' 'search.x={choice: [1, 2]}'")


def _run_script(script: Path, tmp_path: Path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "SLOTSWEEP_HOME")}
    return subprocess.run([sys.executable, str(script), "sweeps/missing.yaml"],
                          env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)


def test_the_cluster_launcher_script_runs_slotsweep_sweep(tmp_path):
    done = _run_script(RUN_SWEEP, tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    shipped = ", ".join(sorted(p.stem for p in (ROOT / "sweeps").glob("*.yaml")))
    assert lines == ["slotsweep: error: sweep file sweeps/missing.yaml does not exist; shipped "
                     f"sweeps: {shipped}"]
    # as `ray submit` runs it: a copy in the home directory, the project found by SLOTSWEEP_HOME
    copy = tmp_path / "run_sweep.py"
    shutil.copy(RUN_SWEEP, copy)
    done = _run_script(copy, tmp_path, SLOTSWEEP_HOME=str(ROOT))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == lines
    done = _run_script(copy, tmp_path, SLOTSWEEP_HOME=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"slotsweep: error: SLOTSWEEP_HOME={tmp_path} is not the "
                                   "slotsweep project (no dashboards/cli.py there): fix or "
                                   "unset it")
