"""docker/: the images, the compose stack, the cluster launcher config and the KubeRay job.

There is no Docker engine (nor Kubernetes) on the machines that run this suite, so nothing here
is built or started: the files are parsed, and checked for agreement with each other and with the
project (image name, Ray and MLflow ports, MLflow variables, credentials, bucket, mounts, the
files and sweep overrides they name).
"""

from __future__ import annotations

import configparser
import copy
import fnmatch
import json
import re
import shlex
import sys
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from core.data.prepare import CACHE_ENV
from core.names import TRACKING_URI_ENV
from orchestrator.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE, CLUSTER, RAYJOB = DOCKER / "compose.yaml", DOCKER / "cluster.yaml", DOCKER / "rayjob.yaml"
APP_DOCKERFILE, MLFLOW_DOCKERFILE = DOCKER / "Dockerfile", DOCKER / "mlflow.Dockerfile"
ENV_EXAMPLE, README = DOCKER / ".env.example", DOCKER / "README.md"
RUN_SWEEP = DOCKER / "run_sweep.py"  # written with orchestrator/submit.py
IMAGE = "slotsweep:latest"
GCS_PORT, DASHBOARD_PORT, MLFLOW_PORT = 6379, 8265, 5000
SHARED = PurePosixPath("/mnt/shared")
PROJECT_HOME = "/home/ray/slotsweep"
RAY_SERVICES = ("ray-head", "ray-worker")
SERVICES = {"postgres", "minio", "minio-init", "mlflow", *RAY_SERVICES}
LOCAL_STATE = {".", "./", "*", ".venv", "runs", "logs", ".git", "mlruns"}  # never in an image
# MLflow 3.17's rules for the bootstrap admin password (mlflow.utils.validation._validate_password
# and the refused legacy default of mlflow.server.auth); MinIO refuses root passwords under 8.
MLFLOW_MIN_PASSWORD, MLFLOW_LEGACY_PASSWORD, MINIO_MIN_PASSWORD = 12, "password1234", 8
MLFLOW_ENV = (TRACKING_URI_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# --------------------------------------------------------------------------- parsers
def dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs: comments dropped, ``\\`` continuations joined."""
    instructions, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # also inside a continuation, as Docker does
            continue
        if line.endswith("\\"):
            buf += line[:-1].strip() + " "
            continue
        keyword, _, args = (buf + line).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path.name}: the last instruction ends with a continuation"
    return instructions


def args_of(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for key, args in instructions if key == keyword]


def copies(instructions: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """``(sources, destination)`` of every COPY/ADD from the build context (not ``--from``)."""
    found = []
    for key, args in instructions:
        if key not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        found.append((words[:-1], words[-1]))
    return found


def pairs(args: str) -> dict[str, str]:
    """ENV / LABEL arguments: ``K=V K2="V 2"`` (or the old ``K V``)."""
    words = shlex.split(args)
    if "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def merged(instructions: list[tuple[str, str]], keyword: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for args in args_of(instructions, keyword):
        out.update(pairs(args))
    return out


# Compose interpolation: $$ is a literal $, ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|\$([A-Za-z_]\w*)")


def strings(node: Any) -> list[str]:
    """Every string value of parsed YAML (Compose interpolates values, never comments)."""
    if isinstance(node, dict):
        return [s for value in node.values() for s in strings(value)]
    if isinstance(node, list):
        return [s for value in node for s in strings(value)]
    return [node] if isinstance(node, str) else []


def compose_vars(text: str) -> dict[str, set[str | None]]:
    """Every variable Compose interpolates -> the defaults it is given (None: no default)."""
    found: dict[str, set[str | None]] = {}
    for value in strings(yaml.safe_load(text)):
        for match in _VAR.finditer(value):
            if match.group(0) != "$$":
                name, op = match.group(1) or match.group(4), match.group(2)
                found.setdefault(name, set()).add(match.group(3) if op in (":-", "-") else None)
    return found


def interpolate(node: Any, env: dict[str, str]) -> Any:
    def value(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, default = match.group(1) or match.group(4), match.group(2), match.group(3)
        if name in env and (env[name] or op != ":-"):
            return env[name]
        assert op in (":-", "-"), f"${{{name}}} is unset and has no default"
        return default

    if isinstance(node, dict):
        return {key: interpolate(item, env) for key, item in node.items()}
    if isinstance(node, list):
        return [interpolate(item, env) for item in node]
    return _VAR.sub(value, node) if isinstance(node, str) else node


def load_compose(env: dict[str, str] | None = None) -> dict:
    """compose.yaml as Compose sees it with ``env`` as docker/.env (None: every default)."""
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def command(service: dict) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def option(words: list[str], name: str) -> str:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in a command line."""
    for i, word in enumerate(words):
        if word.startswith(f"{name}="):
            return word.split("=", 1)[1]
        if word == name:
            return words[i + 1]
    raise AssertionError(f"{name} is not in {' '.join(words)}")


def volumes(service: dict) -> dict[str, str]:
    """A service's short-syntax volumes: target -> source."""
    out = {}
    for item in service.get("volumes", []):
        source, target = item.split(":")[:2]
        out[target] = source
    return out


def published(service: dict) -> dict[int, int]:
    """container port -> host port of a service's ``ports``."""
    out = {}
    for item in service.get("ports", []):
        host, container = str(item).rsplit(":", 2)[-2:]
        out[int(container.split("/")[0])] = int(host)
    return out


def run_options(cluster: dict) -> dict[str, str]:
    """``-e NAME=VALUE`` items of the cluster launcher's ``docker.run_options``."""
    out = {}
    for item in cluster["docker"]["run_options"]:
        words = shlex.split(item)
        if words[0] in ("-e", "--env"):
            name, _, value = words[1].partition("=")
            out[name] = value
    return out


def pods(job: dict) -> list[dict]:
    """The pod specs of a RayJob: the head's, then each worker group's."""
    spec = job["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in spec["workerGroupSpecs"]
    ]


def k8s_env(container: dict) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def port_of(uri: str) -> int:
    parts = urllib.parse.urlsplit(uri)
    return parts.port or {"http": 80, "https": 443}[parts.scheme]


def pyproject() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str):
    """pyproject's requirement on ``name`` as a packaging Requirement."""
    requirements = pytest.importorskip("packaging.requirements")
    for item in pyproject()["project"]["dependencies"]:
        req = requirements.Requirement(item)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not require {name}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


@pytest.fixture(scope="module")
def app() -> list[tuple[str, str]]:
    return dockerfile(APP_DOCKERFILE)


# --------------------------------------------------------------------------- the files parse
def test_yaml_files_parse(compose, cluster, rayjob):
    assert set(compose["services"]) == SERVICES
    assert {"cluster_name", "provider", "docker", "head_start_ray_commands"} <= set(cluster)
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")


def test_dockerfile_parser_joins_continuations_and_drops_comments(tmp_path):
    path = tmp_path / "Dockerfile"
    path.write_text('# c\nFROM a:1\nRUN x \\\n    # inside\n    && y\nENV A=1 B="two words"\n')
    parsed = dockerfile(path)
    assert parsed == [("FROM", "a:1"), ("RUN", "x && y"), ("ENV", 'A=1 B="two words"')]
    assert merged(parsed, "ENV") == {"A": "1", "B": "two words"}


# --------------------------------------------------------------------------- the images
def test_app_image_is_ray_on_cuda_as_a_user_with_the_project_installed(app):
    (base,) = args_of(app, "FROM")
    assert re.fullmatch(r"rayproject/ray:\d+\.\d+\.\d+-py3\d+-cu\d+", base), base
    users = args_of(app, "USER")
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert args_of(app, "WORKDIR")[-1] == PROJECT_HOME
    runs = " ".join(args_of(app, "RUN"))
    assert re.search(r"pip install (--no-cache-dir )?-e \.", runs), runs
    env = merged(app, "ENV")
    assert PurePosixPath(env[CACHE_ENV]).is_relative_to(SHARED), env
    assert any("slotsweep" in v for v in merged(app, "LABEL").values())
    exposed = {int(p.split("/")[0]) for args in args_of(app, "EXPOSE") for p in args.split()}
    assert exposed == {GCS_PORT, DASHBOARD_PORT}


def test_app_image_ray_and_python_agree_with_pyproject_and_rayjob(app, rayjob):
    (base,) = args_of(app, "FROM")
    match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-cu\d+", base)
    ray_version, python = match.group(1), f"{match.group(2)}.{match.group(3)}"
    assert requirement("ray").specifier.contains(ray_version), "pip would replace the image's Ray"
    assert f"ray.__version__ == '{ray_version}'" in " ".join(args_of(app, "RUN"))
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray_version
    specifiers = pytest.importorskip("packaging.specifiers")
    requires = specifiers.SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires.contains(python)


def test_every_copy_source_exists_and_local_state_is_never_copied(app):
    for path, context in ((APP_DOCKERFILE, ROOT), (MLFLOW_DOCKERFILE, DOCKER)):
        for sources, _ in copies(dockerfile(path)):
            for source in sources:
                assert source.rstrip("/") not in LOCAL_STATE and source not in LOCAL_STATE
                assert (context / source).exists(), f"{path.name}: COPY {source}: no such file"
    copied = {s.rstrip("/") for sources, _ in copies(app) for s in sources}
    # what `pip install -e .` needs: pyproject, its readme and every package it finds
    config = pyproject()
    packages = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", config["project"]["readme"], *packages} <= copied, copied
    assert "sweeps" in copied
    ignored = set((DOCKER / "Dockerfile.dockerignore").read_text().split())
    assert {".venv", "runs", "logs", ".git"} <= ignored


def test_mlflow_image_matches_the_pinned_mlflow_and_has_the_store_drivers():
    instructions = dockerfile(MLFLOW_DOCKERFILE)
    (base,) = args_of(instructions, "FROM")
    match = re.fullmatch(r"ghcr\.io/mlflow/mlflow:v([\d.]+)", base)
    assert match, base
    assert requirement("mlflow").specifier.contains(match.group(1))
    installs = " ".join(args_of(instructions, "RUN"))
    assert "pip install" in installs and {"psycopg2-binary", "boto3"} <= set(installs.split())
    assert '"Flask-WTF<2"' in installs.split()  # mlflow[auth]: the basic-auth app needs it


# --------------------------------------------------------------------------- agreement
def test_one_image_name_everywhere(compose, cluster, rayjob):
    for name in RAY_SERVICES:
        service = compose["services"][name]
        assert service["image"] == IMAGE
        build = service["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == APP_DOCKERFILE
    mlflow_build = compose["services"]["mlflow"]["build"]
    assert (COMPOSE.parent / mlflow_build["context"] / mlflow_build["dockerfile"]).resolve() == (
        MLFLOW_DOCKERFILE
    )
    assert cluster["docker"]["image"] == IMAGE
    images = {c["image"] for pod in pods(rayjob) for c in pod["containers"]}
    assert images == {IMAGE}


def test_ray_ports_agree(compose, cluster, rayjob):
    head, worker = (compose["services"][name] for name in RAY_SERVICES)
    words = command(head)
    assert words[:3] == ["ray", "start", "--head"] and "--block" in words
    assert int(option(words, "--port")) == GCS_PORT
    assert int(option(words, "--dashboard-port")) == DASHBOARD_PORT
    assert option(words, "--dashboard-host") == "0.0.0.0"
    assert published(head) == {GCS_PORT: GCS_PORT, DASHBOARD_PORT: DASHBOARD_PORT}
    assert option(command(worker), "--address") == f"ray-head:{GCS_PORT}"

    start = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    assert cluster["head_start_ray_commands"][0] == "ray stop" and len(start) == 1
    words = shlex.split(start[0])
    assert int(option(words, "--port")) == GCS_PORT
    assert int(option(words, "--dashboard-port")) == DASHBOARD_PORT
    (join,) = [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]
    assert option(shlex.split(join), "--address") == f"$RAY_HEAD_IP:{GCS_PORT}"

    head_group = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    (container,) = head_group["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["gcs-server"] == GCS_PORT and ports["dashboard"] == DASHBOARD_PORT
    params = head_group["rayStartParams"]
    assert int(params.get("port", GCS_PORT)) == GCS_PORT
    assert int(params.get("dashboard-port", DASHBOARD_PORT)) == DASHBOARD_PORT


def test_mlflow_port_agrees(compose, cluster, rayjob):
    mlflow = compose["services"]["mlflow"]
    words = command(mlflow)
    assert words[:2] == ["mlflow", "server"]
    assert int(option(words, "--port")) == MLFLOW_PORT and option(words, "--host") == "0.0.0.0"
    assert published(mlflow) == {MLFLOW_PORT: MLFLOW_PORT}
    assert f"localhost:{MLFLOW_PORT}/health" in " ".join(mlflow["healthcheck"]["test"])
    uris = [compose["services"][name]["environment"][TRACKING_URI_ENV] for name in RAY_SERVICES]
    assert {urllib.parse.urlsplit(u).hostname for u in uris} == {"mlflow"}  # the service name
    uris.append(run_options(cluster)[TRACKING_URI_ENV])
    uris += [k8s_env(c)[TRACKING_URI_ENV] for pod in pods(rayjob) for c in pod["containers"]]
    assert {port_of(u) for u in uris} == {MLFLOW_PORT}, uris


def test_mlflow_variables_reach_every_ray_node(compose, cluster, rayjob):
    for name in RAY_SERVICES:
        assert set(MLFLOW_ENV) <= set(compose["services"][name]["environment"]), name
    assert set(MLFLOW_ENV) <= set(run_options(cluster))
    for pod in pods(rayjob):
        for container in pod["containers"]:
            env = k8s_env(container)
            assert set(MLFLOW_ENV) <= set(env), container["name"]
            for name in MLFLOW_ENV[1:]:  # the login comes from the Secret
                assert env[name]["secretKeyRef"]["name"] == "slotsweep-mlflow"


def test_every_compose_variable_is_in_env_example_with_the_same_default():
    used, example = compose_vars(COMPOSE.read_text()), env_example()
    assert set(used) == set(example), set(used) ^ set(example)
    for name, defaults in used.items():
        assert defaults == {example[name]}, f"{name}: defaults {defaults} vs .env.example"


@pytest.mark.parametrize("dotenv", ["defaults", "overridden"])
def test_credentials_agree_between_services(dotenv):
    env = {} if dotenv == "defaults" else {k: f"{k.lower()}-x7Kq2pLm9" for k in env_example()}
    services = load_compose(env)["services"]
    minio, init, mlflow = services["minio"], services["minio-init"], services["mlflow"]
    user, password = (minio["environment"][k] for k in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"))
    assert mlflow["environment"]["AWS_ACCESS_KEY_ID"] == user
    assert mlflow["environment"]["AWS_SECRET_ACCESS_KEY"] == password
    assert (init["environment"]["MINIO_ROOT_USER"], init["environment"]["MINIO_ROOT_PASSWORD"]) == (
        user, password)
    pg = services["postgres"]["environment"]
    store = urllib.parse.urlsplit(option(command(mlflow), "--backend-store-uri"))
    # the driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, not psycopg2
    assert (store.scheme, store.hostname, store.port) == (
        "postgresql+psycopg2", "postgres", 5432)
    assert (store.username, store.password, store.path) == (
        pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], "/" + pg["POSTGRES_DB"])
    admin = (mlflow["environment"]["MLFLOW_AUTH_ADMIN_USERNAME"],
             mlflow["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"])
    head, worker = (services[name]["environment"] for name in RAY_SERVICES)
    for node in (head, worker):
        assert (node["MLFLOW_TRACKING_USERNAME"], node["MLFLOW_TRACKING_PASSWORD"]) == admin
        assert node["RAY_AUTH_MODE"] == "token"
    assert head["RAY_AUTH_TOKEN"] == worker["RAY_AUTH_TOKEN"] != ""
    assert len(admin[1]) >= MLFLOW_MIN_PASSWORD and admin[1] != MLFLOW_LEGACY_PASSWORD
    assert len(password) >= MINIO_MIN_PASSWORD


def test_minio_init_creates_the_artifact_bucket(compose):
    services = compose["services"]
    mlflow, init = services["mlflow"], services["minio-init"]
    destination = urllib.parse.urlsplit(option(command(mlflow), "--artifacts-destination"))
    assert destination.scheme == "s3" and "--serve-artifacts" in command(mlflow)
    buckets = re.findall(r"mc mb (?:--ignore-existing )?\w+/([\w.-]+)", " ".join(command(init)))
    assert buckets == [destination.hostname]
    endpoint = urllib.parse.urlsplit(mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.hostname == "minio" and endpoint.port in published(services["minio"])
    assert f"http://minio:{endpoint.port}" in " ".join(command(init))
    assert mlflow["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_basic_auth_ini_exists_and_is_mounted_where_mlflow_reads_it(compose):
    mlflow = compose["services"]["mlflow"]
    assert option(command(mlflow), "--app-name") == "basic-auth"
    target = mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    mounts = volumes(mlflow)
    source = (COMPOSE.parent / mounts[target]).resolve()
    assert source == DOCKER / "basic_auth.ini" and source.is_file()
    ini = configparser.ConfigParser()
    ini.read(source)
    assert ini["mlflow"]["default_permission"] in ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")
    database = ini["mlflow"]["database_uri"]
    assert database.startswith("sqlite:////"), database  # an absolute path ...
    folder = str(PurePosixPath(database.removeprefix("sqlite:///")).parent)
    assert folder in mounts and mounts[folder] in compose["volumes"]  # ... on a named volume
    # the admin comes from the environment, so no password sits in the repository
    assert "admin_password" not in ini["mlflow"]


def test_mlflow_answers_the_host_names_the_ray_nodes_use(compose):
    """MLflow 3's DNS-rebinding guard (mlflow.server.security_utils.is_allowed_host_header):
    a Host header must match one of MLFLOW_SERVER_ALLOWED_HOSTS (fnmatch when it has a ``*``)."""
    allowed = compose["services"]["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    patterns = [p.strip() for p in allowed.split(",")]

    def answers(host: str) -> bool:
        return "*" in patterns or any(
            fnmatch.fnmatch(host, p) if "*" in p else host == p for p in patterns
        )

    for name in RAY_SERVICES:
        uri = compose["services"][name]["environment"][TRACKING_URI_ENV]
        assert answers(urllib.parse.urlsplit(uri).netloc), uri
    assert answers(f"localhost:{MLFLOW_PORT}") and answers(f"192.168.1.20:{MLFLOW_PORT}")


def test_every_ray_node_sees_the_shared_storage(compose, cluster, rayjob, app):
    sources = set()
    for name in RAY_SERVICES:
        service = compose["services"][name]
        mounts = volumes(service)
        sources.add(mounts[str(SHARED)])
        assert int(re.match(r"\d+", str(service["shm_size"])).group()) >= 1
    assert len(sources) == 1 and sources <= set(compose["volumes"])
    assert f"-v {SHARED}:{SHARED}" in cluster["docker"]["run_options"]
    for pod in pods(rayjob):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert claims[mounts[str(SHARED)]] == "slotsweep-shared"
    storage = re.search(r"storage=(\S+)", rayjob["spec"]["entrypoint"]).group(1)
    assert PurePosixPath(storage).is_relative_to(SHARED)
    assert PurePosixPath(merged(app, "ENV")[CACHE_ENV]).is_relative_to(SHARED)


def test_gpus_reach_the_workers_and_fit_the_real_sweep(compose, cluster, rayjob):
    for name in RAY_SERVICES:
        devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--gpus all" in cluster["docker"]["run_options"]
    sweep = yaml.safe_load((ROOT / "sweeps" / "saycam_slots.yaml").read_text())
    per_trial = sweep["resources"]
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = 0.0
    for group in groups:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert float(limits["nvidia.com/gpu"]) >= per_trial["gpus_per_trial"]
        assert float(limits["cpu"]) >= per_trial["cpus_per_trial"]
        gpus += float(limits["nvidia.com/gpu"]) * group["maxReplicas"]
    assert gpus >= sweep["concurrency"] * per_trial["gpus_per_trial"]


def test_cluster_launcher_config_is_valid_for_ray(cluster, app):
    util = pytest.importorskip("ray.autoscaler._private.util")
    # Ray's own checks: its schema, with the local provider's node type filled in
    util.validate_config(util.prepare_config(copy.deepcopy(cluster)))
    provider = cluster["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    assert cluster["auth"]["ssh_user"]
    docker = cluster["docker"]
    assert (docker["container_name"], docker["pull_before_run"]) == ("slotsweep", False)
    assert cluster["setup_commands"] == []
    copied = {s.rstrip("/") for sources, _ in copies(app) for s in sources}
    for remote, local in cluster["file_mounts"].items():
        assert (ROOT / local).is_dir(), f"{local}: a folder of the repository (run from its root)"
        assert str(PurePosixPath(remote).parent) == PROJECT_HOME
        assert PurePosixPath(remote).name == Path(local).name and Path(local).name in copied
    assert {".venv", "runs", "logs", ".git"} <= set(cluster["rsync_exclude"])


def test_rayjob_runs_the_sweep_and_cleans_up(rayjob, app):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    entry = spec["entrypoint"]
    assert f"cd {args_of(app, 'WORKDIR')[-1]} &&" in entry
    assert "slotsweep sweep sweeps/saycam_slots.yaml storage=/mnt/shared/sweeps" in entry
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in groups)


# --------------------------------------------------------------------------- named files
_NAMED_FILES = (COMPOSE, CLUSTER, RAYJOB, APP_DOCKERFILE, MLFLOW_DOCKERFILE, ENV_EXAMPLE, README,
                DOCKER / "basic_auth.ini")
_PATH = re.compile(r"(?<![\w/.=])((?:docker|sweeps)/[\w.-]*\w)")


def test_every_file_the_docker_files_name_exists():
    for path in _NAMED_FILES:
        for name in set(_PATH.findall(path.read_text())):
            if name == "docker/.env" or "NAME" in name or name == str(RUN_SWEEP.relative_to(ROOT)):
                continue  # made by the user / a placeholder / its own test below
            assert (ROOT / name).exists(), f"{path.name} names {name}, which does not exist"


def sweep_commands(text: str) -> list[list[str]]:
    """Every command line that runs a sweep file (`slotsweep sweep|submit`, `run_sweep.py --`),
    continuation lines (also commented ones) joined, as words."""
    text = re.sub(r"\\\n#?\s*", " ", text)
    found = []
    for line in text.splitlines():
        line = line.lstrip("# ").strip()
        if re.search(r"(slotsweep (sweep|submit)|run_sweep\.py --) sweeps/[\w-]+\.yaml", line):
            found.append(shlex.split(line, comments=True))
    return found


def code_blocks(markdown: str) -> str:
    return "\n".join(markdown.split("```")[1::2])


def test_sweep_commands_in_the_docker_files_load():
    texts = [CLUSTER.read_text(), yaml.safe_load(RAYJOB.read_text())["spec"]["entrypoint"],
             code_blocks(README.read_text())]
    lines = [words for text in texts for words in sweep_commands(text)]
    assert len(lines) >= 6, lines
    for words in lines:
        i = next(i for i, w in enumerate(words) if re.fullmatch(r"sweeps/[\w-]+\.yaml", w))
        overrides = [w for w in words[i + 1:] if "=" in w and not w.startswith("-")]
        load_sweep(ROOT / words[i], overrides)  # raises ConfigError on a bad key or value


def test_run_sweep_script_is_where_the_docs_say():
    if not RUN_SWEEP.exists():
        pytest.skip("docker/run_sweep.py is not written yet")
    usage = "ray submit docker/cluster.yaml docker/run_sweep.py -- sweeps/"
    assert usage in CLUSTER.read_text() and usage in README.read_text()
