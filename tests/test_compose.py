"""docker-compose.yml started for real, without Docker: podman and podman-compose with images built
from Debian's packages (cluster/podman/build_images.sh, compose.sh and docker-compose.podman.yml).
PostgreSQL, MLflow with basic auth, a Ray head with the Jobs API and token auth and a Ray worker,
published on 127.0.0.1 only. `bnew` on this machine submits the demo through the published Jobs
API with the Ray token, its nodes log to http://mlflow:5000, and MLflow's runs survive
`down` + `up` (the named volumes). The first build takes a while (debootstrap, the wheels, the
image); later runs reuse .cache/podman and podman's layers."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = pytest.mark.long

if shutil.which("podman") is None and not os.environ.get("CI"):
    pytest.skip("podman is not installed (cluster/podman/build_images.sh installs it, as root; CI runs this test)",
                allow_module_level=True)

REPO = Path(__file__).parents[1]
SCRIPTS = REPO / "cluster" / "podman"
BIN = Path(sys.executable).parent
PROJECT = "bnew-sweep-test"
"""Not the compose's own `bnew-sweep`: a stack someone started from this checkout keeps its volumes."""
MLFLOW, JOBS_API = "http://127.0.0.1:5000", "http://127.0.0.1:8265"
SEARCH = f"{MLFLOW}/api/2.0/mlflow/experiments/search?max_results=1"


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def compose(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    result = run([str(SCRIPTS / "compose.sh"), *args], env, timeout)
    assert result.returncode == 0, f"compose.sh {' '.join(args)}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def status_of(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The stack's secrets (an env file of the test's own, not the checkout's .env), once it is healthy."""
    for port in (5000, 8265):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} is taken; the compose stack publishes MLflow on 5000 and Ray's Jobs API on 8265")
    folder = tmp_path_factory.mktemp("compose")
    data = folder / "data"  # /work/data in the containers, read by user ray
    data.mkdir()
    folder.chmod(0o755)
    data.chmod(0o755)
    secret = {name: secrets.token_hex(16) for name in
              ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_SECRET_KEY", "RAY_AUTH_TOKEN")}
    secret |= {"MLFLOW_ADMIN_USER": "admin", "BNEW_DATA_HOST_DIR": str(data)}
    env_file = folder / "stack.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in secret.items()))
    # The process environment wins over the env file in compose: the same values in both.
    env = {**os.environ, **secret, "BNEW_COMPOSE_ENV_FILE": str(env_file), "BNEW_COMPOSE_PROJECT": PROJECT}
    built = run([str(SCRIPTS / "build_images.sh")], env, timeout=3600)
    assert built.returncode == 0, f"build_images.sh:\n{built.stdout[-3000:]}\n{built.stderr[-6000:]}"
    try:
        compose("up", env=env)
        yield env
    finally:
        run([str(SCRIPTS / "compose.sh"), "down", "-v"], env, timeout=600)


def client_env(stack: dict[str, str], home: Path) -> dict[str, str]:
    """This machine's side: the published ports, the Ray token, MLflow's credentials."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(home),
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": stack["RAY_AUTH_TOKEN"],
            "RAY_API_SERVER_ADDRESS": JOBS_API, "MLFLOW_TRACKING_URI": MLFLOW,
            "MLFLOW_TRACKING_USERNAME": stack["MLFLOW_ADMIN_USER"],
            "MLFLOW_TRACKING_PASSWORD": stack["MLFLOW_ADMIN_PASSWORD"]}


def demo_runs(env: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The demo experiment's runs as MLflow answers through its published port: id -> (name, status)."""
    script = ("import json, mlflow; c = mlflow.MlflowClient(); e = c.get_experiment_by_name('demo'); "
              "print(json.dumps({r.info.run_id: [r.info.run_name, r.info.status, r.data.tags.get('bnew.role')] "
              "for r in (c.search_runs([e.experiment_id], max_results=1000) if e else [])}))")
    result = subprocess.run([str(BIN / "python"), "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {run_id: tuple(value) for run_id, value in json.loads(result.stdout.splitlines()[-1]).items()}


def test_compose_stack_runs_the_demo_and_keeps_its_runs_across_down_and_up(stack: dict[str, str], tmp_path: Path) -> None:
    credentials = (stack["MLFLOW_ADMIN_USER"], stack["MLFLOW_ADMIN_PASSWORD"])
    assert status_of(SEARCH) == 401  # MLflow's basic auth: nothing without credentials
    assert status_of(SEARCH, credentials) == 200
    assert status_of(SEARCH, (credentials[0], "wrong")) == 401
    listening = subprocess.run(["podman", "ps", "--filter", f"label=io.podman.compose.project={PROJECT}",
                                "--format", "{{.Names}} {{.Ports}}"], capture_output=True, text=True, env=stack)
    assert listening.returncode == 0 and "ray-worker" in listening.stdout, listening.stderr
    published = re.findall(r"(\S+):(\d+)->", listening.stdout)
    assert sorted(published) == [("127.0.0.1", "5000"), ("127.0.0.1", "8265")], listening.stdout

    env = client_env(stack, tmp_path)
    submitted = subprocess.run(
        [str(BIN / "bnew"), "sweep", "submit", "demo", "--max-epochs", "1", "--max-batches", "2",
         "--tracking-uri", "http://mlflow:5000", "--follow"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    output = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, output[-5000:]
    assert "versions differ" not in output and "could not read the cluster's versions" not in output, output[-3000:]
    job = re.search(r"submitted job (\S+)", submitted.stdout).group(1)
    assert f"job {job}: SUCCEEDED" in submitted.stdout, output[-5000:]
    assert "sweep demo: 12 stages trained, 0 reused" in submitted.stdout, output[-5000:]
    listed = subprocess.run([str(BIN / "bnew"), "sweep", "jobs"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert re.search(rf"{job}\s.*demo\s.*SUCCEEDED", listed.stdout), listed.stdout + listed.stderr

    before = demo_runs(env)
    trials = [name for name, status, role in before.values() if role == "trial"]
    assert len(trials) == 12, before
    assert {status for _, status, role in before.values() if role == "trial"} == {"FINISHED"}, before

    # Containers gone, volumes kept: PostgreSQL's data and MLflow's artifacts come back.
    compose("down", env=stack, timeout=600)
    with pytest.raises(urllib.error.URLError):  # nothing answers on the published port
        status_of(f"{MLFLOW}/health")
    compose("up", env=stack)
    assert status_of(SEARCH) == 401 and status_of(SEARCH, credentials) == 200
    assert demo_runs(env) == before
