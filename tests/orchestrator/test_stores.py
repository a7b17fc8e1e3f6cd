"""The team stack's real stores: MLflow on PostgreSQL behind basic-auth login, as
docker/compose.yaml runs it (artifacts served from a folder instead of MinIO), started here on
loopback; and the one line slotsweep gives when such a server refuses its login."""

from __future__ import annotations

import glob
import http.server
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
import pytest
from mlflow import MlflowClient
from mlflow_runs import sweep_runs
from processes import alive, descendants

from core.errors import SlotsweepError
from orchestrator.mlflow_server import LocalServer, check_tracking_uri

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"
ADMIN, PASSWORD = "admin", "slotsweep-admin-password"  # MLflow wants 12+ characters
DB_USER, DB_PASSWORD = "mlflow", "slotsweep-postgres"
LOGIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


class Postgres:
    """A PostgreSQL server in a temporary folder on 127.0.0.1 with database ``mlflow``. The
    server refuses to run as root: under root it runs as the ``postgres`` user of Debian's
    package, in a folder outside pytest's (private) temporary folders."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_program("initdb"), _pg_program("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not found: install the "
                        "Debian package postgresql (.ci/run does)")
        self.as_user: dict = {}
        owner = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root needs the 'postgres' user for PostgreSQL: install "
                            "the Debian package postgresql")
            self.as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        self.folder = Path(tempfile.mkdtemp(prefix="slotsweep-pg-"))
        (self.folder / "pw").write_text(DB_PASSWORD)
        if owner is not None:
            for path in (self.folder, self.folder / "pw"):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.data, self.port = self.folder / "data", _free_port()
        self._run(self.initdb, "-D", self.data, "-U", DB_USER, f"--pwfile={self.folder / 'pw'}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions")
        self._run(self.pg_ctl, "start", "-w", "-t", "60", "-D", self.data,
                  "-l", self.folder / "postgres.log",
                  "-o", f"-h 127.0.0.1 -p {self.port} -k '' -c fsync=off")
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        try:
            conn = self.connect("postgres")
            conn.cursor().execute("CREATE DATABASE mlflow")
            conn.close()
        except BaseException:
            self.stop()
            raise
        self.uri = f"postgresql+psycopg2://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/mlflow"

    def _run(self, *cmd: object) -> None:
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120,
                             **self.as_user)
        log = self.folder / "postgres.log"
        assert out.returncode == 0, (out.stdout, out.stderr,
                                     log.read_text()[-2000:] if log.is_file() else "")

    def connect(self, database: str = "mlflow"):
        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER,
                                password=DB_PASSWORD, dbname=database)
        conn.autocommit = True
        return conn

    def query(self, sql: str, *args: object) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._run(self.pg_ctl, "stop", "-w", "-m", "fast", "-D", self.data)
        shutil.rmtree(self.folder)


@pytest.fixture(scope="module")
def postgres():
    server = Postgres()
    try:
        yield server
    finally:
        server.stop()
        assert not alive({server.pid}), "PostgreSQL still runs"


def _start_team_server(root: Path, backend: str) -> LocalServer:
    """``mlflow server --app-name basic-auth`` on ``backend``, configured as compose configures
    it (admin from MLFLOW_AUTH_ADMIN_*, the user store in SQLite), artifacts under ``root``."""
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    env = {k: v for k, v in os.environ.items() if k not in LOGIN_ENV}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD,
               MLFLOW_FLASK_SERVER_SECRET_KEY="slotsweep-test-secret",
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--app-name", "basic-auth"]  # fmt: skip
    with open(root / "server.log", "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=root)
    server = LocalServer(root, port, process)  # its stop(): SIGTERM, then SIGKILL, the group
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with NO_PROXY.open(f"{server.uri}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    pytest.fail(f"MLflow on {backend} did not start: {(root / 'server.log').read_text()[-3000:]}")


@pytest.fixture(scope="module")
def team(postgres, tmp_path_factory):
    """The team MLflow server: PostgreSQL backend store, basic-auth login."""
    server = _start_team_server(tmp_path_factory.mktemp("team"), postgres.uri)
    group = {server.pid} | descendants(server.pid)
    try:
        yield server
    finally:
        server.stop()
        deadline = time.monotonic() + 15
        while alive(group) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(group), f"MLflow server processes left: {sorted(alive(group))}"


def _get(url: str, login: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if login is not None:
        import base64

        pair = base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with NO_PROXY.open(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _env(tmp_path: Path, password: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*LOGIN_ENV, "MLFLOW_TRACKING_URI")}
    env.pop("RAY_ADDRESS", None)
    env["SLOTSWEEP_CACHE"] = str(tmp_path.parent / "stores-cache")
    env["HOME"] = str(tmp_path)  # no ~/.mlflow/credentials of the machine's user
    if password is not None:
        env.update(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=password)
    return env


def _slotsweep(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600
               ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("slotsweep: error: "), err
    return err[len("slotsweep: error: "):]


def _sweep_args(storage: Path, uri: str, name: str) -> list[str]:
    return ["sweep", str(QUICKSTART), f"name={name}", f"storage={storage}", "trials=1",
            "trainer.max_steps=4", f"mlflow.tracking_uri={uri}", f"mlflow.experiment={name}"]


# ----------------------------------------------------------------- the message, no real server
class _Auth(http.server.BaseHTTPRequestHandler):
    """/health answers (no login, as on MLflow's basic-auth app); the API answers ``code``."""

    code, seen = 401, []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        status = 200 if self.path == "/health" else type(self).code
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_server(monkeypatch, tmp_path):
    for key in LOGIN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    _Auth.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Auth)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _refusal(uri: str, **kwargs: object) -> str:
    with pytest.raises(SlotsweepError) as info:
        check_tracking_uri(uri, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"MLflow at {uri} "), message
    return message


def test_a_refused_login_is_one_line_naming_the_variables(fake_server, monkeypatch):
    uri = fake_server
    assert _refusal(uri) == (f"MLflow at {uri} needs a login (HTTP 401): set "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    check_tracking_uri(uri, own_login=False)  # a Ray job's nodes may bring their own login
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    assert _refusal(uri) == (f"MLflow at {uri} refused the credentials (HTTP 401): check "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    assert _Auth.seen[-1] == "Basic YWxpY2U6d3Jvbmc="  # alice:wrong, as MLflow's client sends it
    _refusal(uri, own_login=False)  # a login given here is forwarded to the job: checked too
    _Auth.code = 403
    try:
        assert "refused access (HTTP 403): check MLFLOW_TRACKING_USERNAME" in _refusal(uri)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
        assert _refusal(uri).endswith("check MLFLOW_TRACKING_TOKEN and the user's permissions")
        assert _Auth.seen[-1] == "Bearer tok"
        _Auth.code = 200
        check_tracking_uri(uri)
    finally:
        _Auth.code = 401


def test_a_login_from_the_credentials_file_is_used(fake_server, tmp_path):
    """MLflow's client also reads ~/.mlflow/credentials: the check sends that login too."""
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = bob\nmlflow_tracking_password = pw\n")
    assert "refused the credentials (HTTP 401)" in _refusal(fake_server)
    assert _Auth.seen[-1] == "Basic Ym9iOnB3"  # bob:pw


# ----------------------------------------------------------------- the team server
def test_the_team_server_refuses_requests_without_a_valid_login(team, postgres):
    search = f"{team.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(f"{team.uri}/health") == 200  # compose's health check needs no login
    assert _get(search) == 401
    assert _get(search, (ADMIN, "wrong-password")) == 401
    assert _get(search, (ADMIN, PASSWORD)) == 200
    tables = {row[0] for row in postgres.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert {"experiments", "runs", "metrics", "registered_models"} <= tables


def test_a_sweep_with_a_wrong_or_no_login_is_one_line(team, tmp_path):
    args = _sweep_args(tmp_path / "storage", team.uri, "refused")
    wrong = _one_line(_slotsweep(args, _env(tmp_path, "wrong-password"), tmp_path))
    assert wrong == (f"MLflow at {team.uri} refused the credentials (HTTP 401): check "
                     "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    none = _one_line(_slotsweep(args, _env(tmp_path, None), tmp_path))
    assert none.startswith(f"MLflow at {team.uri} needs a login (HTTP 401)")
    assert not (tmp_path / "storage" / "refused").exists()  # refused before anything started


@pytest.mark.slow
def test_sweep_promote_and_rerun_on_postgres_with_login(team, postgres, tmp_path, monkeypatch):
    """A sweep logs to the team server, its best trial is promoted to the registry and rerun
    locally: every run, metric and model version is in PostgreSQL."""
    env = _env(tmp_path, PASSWORD)
    proc = _slotsweep(_sweep_args(tmp_path, team.uri, "pg"), env, tmp_path)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    record = json.loads((tmp_path / "pg" / "best.json").read_text())
    best = record["best"]
    assert record["complete"] and record["mlflow"]["tracking_uri"] == team.uri

    for key in LOGIN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    parents, children = sweep_runs(team.uri, "pg")
    assert [r.info.status for r in parents] == ["FINISHED"]
    assert [r.info.run_id for r in children] == [best["mlflow_run_id"]]
    stored = dict(postgres.query(
        "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e "
        "ON r.experiment_id = e.experiment_id WHERE e.name = %s", "pg"))
    assert stored == {parents[0].info.run_id: "FINISHED", best["mlflow_run_id"]: "FINISHED"}
    steps = postgres.query("SELECT step FROM metrics WHERE run_uuid = %s AND key = 'val/ari'",
                           best["mlflow_run_id"])
    assert steps == [(4,)]

    proc = _slotsweep(["promote", str(tmp_path / "pg"), "--name", "pg-slots",
                       "--tracking-uri", team.uri], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered pg-slots version 1 as @champion" in proc.stdout
    version = MlflowClient(team.uri).get_model_version_by_alias("pg-slots", "champion")
    assert version.tags["source_run"] == best["mlflow_run_id"]
    assert postgres.query("SELECT name, version FROM model_versions") == [("pg-slots", 1)]

    proc = _slotsweep(["rerun", best["mlflow_run_id"], "--tracking-uri", team.uri,
                       "--log-dir", str(tmp_path / "reruns")], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(team.uri)
    reruns = client.search_runs([record["mlflow"]["experiment_id"]],
                                f"tags.rerun_of = '{best['mlflow_run_id']}'")
    assert [r.info.status for r in reruns] == ["FINISHED"]
    for key in ("train/loss", "val/ari"):
        a = {m.step: m.value for m in client.get_metric_history(best["mlflow_run_id"], key)}
        b = {m.step: m.value for m in client.get_metric_history(reruns[0].info.run_id, key)}
        assert set(a) == set(b) and a, key
        assert all(b[s] == pytest.approx(a[s], abs=1e-6) for s in a), key

    wrong = _one_line(_slotsweep(["promote", str(tmp_path / "pg"), "--tracking-uri", team.uri],
                                 _env(tmp_path, "wrong-password"), tmp_path))
    assert "refused the credentials (HTTP 401)" in wrong
