"""Static checks of the cluster set-ups that cannot run here (no Docker engine, no Kubernetes, no
cloud): docker-compose, the KubeRay manifests and the cluster-launcher YAML parse and validate
against their schemas (all on disk: check-jsonschema's copy of the Compose spec, the Kubernetes
schemas of kubernetes-validate, Ray's own launcher schema, a small KubeRay schema in
tests/schemas/), run the image the package pins, start Ray and MLflow with the flags of
cluster/start_local.sh (which the loopback tests run), and publish nothing beyond 127.0.0.1."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import base64
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml
from mlflow.server.security_utils import is_allowed_host_header
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).parents[1]
K8S = REPO / "cluster" / "k8s"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
IMAGE = f"bnew-sweep:{PROJECT['version']}-ray{ray.__version__}"
"""The cluster image's name and tag everywhere: the package's version and the Ray it runs."""

LOOPBACK_ONLY = {
    "ray-head": {"--node-ip-address", "--temp-dir", "--ray-client-server-port", "--dashboard-agent-listen-port"},
    "ray-worker": {"--node-ip-address", "--dashboard-agent-listen-port", "--num-cpus"},
    "mlflow": set(),
}
"""Flags start_local.sh needs because all its nodes share one machine: the loopback address, a
short private socket folder, free ports for each node's agent and Ray Client (several clusters on
one host), and each worker's share of the CPUs (a container, pod or VM counts its own)."""
DEPLOYED_ONLY = {"--block", "--autoscaling-config", "--allowed-hosts"}
"""Flags of the real set-ups only: `ray start` in the foreground of a container, the launcher's
autoscaler, and MLflow's allowed Host headers (the server is called by a DNS name there)."""


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's `!reset` / `!override` tags (what they tag is kept, marked)."""


def tagged(loader: yaml.Loader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value = {yaml.ScalarNode: loader.construct_scalar, yaml.SequenceNode: loader.construct_sequence,
             yaml.MappingNode: loader.construct_mapping}[type(node)](node)
    return {"!tag": suffix, "value": value}


ComposeLoader.add_multi_constructor("!", tagged)


def load_compose(name: str) -> dict[str, Any]:
    return yaml.load((REPO / name).read_text(), Loader=ComposeLoader)


def strip_tags(document: Any) -> Any:
    """Compose's view for its schema: `!reset` values as the (empty) values they reset to."""
    if isinstance(document, dict):
        if "!tag" in document:
            return strip_tags(document["value"])
        return {key: strip_tags(value) for key, value in document.items()}
    if isinstance(document, list):
        return [strip_tags(item) for item in document]
    return document


def k8s_documents() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in k8s_documents() if doc["kind"] == kind]


def aws() -> dict[str, Any]:
    return yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())


def flags(command: str | list[str]) -> set[str]:
    """The `--options` of a command line (`--key value` or `--key=value`)."""
    tokens = shlex.split(command) if isinstance(command, str) else command
    return {token.split("=", 1)[0] for token in tokens if token.startswith("--")}


def segment(text: str, program: str) -> str:
    """The part of a shell line from `PROGRAM` to the next redirection, `&&`, `||` or `)`."""
    match = re.search(rf"{program}(.*?)(?:>|&&|\|\||\)|$)", text, re.S)
    assert match, f"no `{program}` in {text[:200]!r}"
    return match.group(0)


def start_local_flags() -> dict[str, set[str]]:
    """`ray start` (head, workers) and `mlflow server` flags of cluster/start_local.sh."""
    script = (REPO / "cluster" / "start_local.sh").read_text().replace("\\\n", " ")
    found = {}
    for line in script.splitlines():
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        if '/ray" start' in line:
            found["ray-head" if "--head" in line else "ray-worker"] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", segment(line, 'ray" start')))
        if '/mlflow" server' in line:
            found["mlflow"] = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", segment(line, 'mlflow" server')))
    assert set(found) == {"ray-head", "ray-worker", "mlflow"}, found
    return found


def deployed_flags() -> dict[str, dict[str, set[str]]]:
    """Each set-up's flags for the same three commands."""
    compose = load_compose("docker-compose.yml")["services"]
    (cluster,) = by_kind("RayCluster")
    (mlflow,) = [doc for doc in by_kind("Deployment") if doc["metadata"]["name"] == "mlflow"]

    def kuberay(group: dict[str, Any], added: set[str]) -> set[str]:
        # KubeRay runs `ray start` with rayStartParams as --key=value plus its own flags; usage
        # stats are turned off by the environment instead of the flag (which takes no value).
        (container,) = group["template"]["spec"]["containers"]
        environment = {item["name"]: item.get("value") for item in container.get("env", [])}
        usage = {"--disable-usage-stats"} if environment.get("RAY_USAGE_STATS_ENABLED") == "0" else set()
        return {f"--{key}" for key in group["rayStartParams"]} | added | usage

    launcher = aws()
    head_line, worker_line = launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]
    return {
        "docker-compose.yml": {name: flags(compose[name]["command"]) for name in ("ray-head", "ray-worker", "mlflow")},
        "cluster/k8s": {
            "ray-head": kuberay(cluster["spec"]["headGroupSpec"], {"--head", "--port", "--block"}),
            "ray-worker": kuberay(cluster["spec"]["workerGroupSpecs"][0], {"--address", "--block"}),
            "mlflow": flags(mlflow["spec"]["template"]["spec"]["containers"][0]["command"]),
        },
        "cluster/aws.yaml": {
            "ray-head": flags(segment(head_line, "ray start")),
            "ray-worker": flags(segment(worker_line, "ray start")),
            "mlflow": flags(segment(head_line, "mlflow server")),
        },
    }


@pytest.mark.parametrize("setup", ["docker-compose.yml", "cluster/k8s", "cluster/aws.yaml"])
def test_ray_and_mlflow_start_with_the_flags_of_start_local(setup: str) -> None:
    local = start_local_flags()
    for role, used in deployed_flags()[setup].items():
        expected = local[role] - LOOPBACK_ONLY[role]
        assert used - DEPLOYED_ONLY == expected, (
            f"{setup} {role}: missing {sorted(expected - used)}, extra {sorted(used - DEPLOYED_ONLY - expected)}")
        if role == "mlflow":
            assert "--allowed-hosts" in used and "--app-name" in used


def allowed_hosts(command: str | list[str]) -> list[str]:
    tokens = shlex.split(command) if isinstance(command, str) else command
    for index, token in enumerate(tokens):
        if token.startswith("--allowed-hosts"):
            value = token.split("=", 1)[1] if "=" in token else tokens[index + 1]
            return value.split(",")
    raise AssertionError("no --allowed-hosts")


def test_mlflow_accepts_the_host_names_the_workers_call_it_by() -> None:
    # MLflow's own matching (its DNS-rebinding guard): the service name, and 127.0.0.1 for the
    # health check and an SSH tunnel from a laptop.
    compose = allowed_hosts(load_compose("docker-compose.yml")["services"]["mlflow"]["command"])
    (mlflow,) = [doc for doc in by_kind("Deployment") if doc["metadata"]["name"] == "mlflow"]
    k8s = allowed_hosts(mlflow["spec"]["template"]["spec"]["containers"][0]["command"])
    launcher = allowed_hosts(segment(aws()["head_start_ray_commands"][-1], "mlflow server").replace("$HEAD_IP", "10.0.3.7"))
    for hosts, callers in ((compose, ["mlflow:5000", "127.0.0.1:5000", "localhost:5000"]),
                           (k8s, ["mlflow:5000", "mlflow.sweeps.svc.cluster.local:5000", "127.0.0.1:5000"]),
                           (launcher, ["10.0.3.7:5000", "127.0.0.1:5000"])):
        for host in callers:
            assert is_allowed_host_header(hosts, host), (host, hosts)
        assert not is_allowed_host_header(hosts, "evil.example.com:5000")


def test_compose_mlflow_command_answers_its_service_name(tmp_path: Path) -> None:
    # The compose's `mlflow server` line run for real, with what exists only in the compose
    # network swapped for local stand-ins (PostgreSQL, the volumes, the container's port).
    command = shlex.split(load_compose("docker-compose.yml")["services"]["mlflow"]["command"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stand_ins = {"--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination": str(tmp_path),
                 "--host": "127.0.0.1", "--port": str(port), "--workers": "1"}
    for option, value in stand_ins.items():
        command[command.index(option) + 1] = value
    auth_ini = tmp_path / "basic_auth.ini"
    auth_ini.write_text((REPO / "cluster" / "mlflow_basic_auth.ini").read_text()
                        .replace("sqlite:////var/lib/mlflow-auth/", f"sqlite:///{tmp_path}/"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_"))},
           "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "a-test-password-1234", "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret"}
    log = (tmp_path / "mlflow.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), *command[1:]], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)  # its workers stop with it

    def status(host: str, credentials: str | None = None, path: str = "/api/2.0/mlflow/experiments/search?max_results=1") -> int:
        headers = {"Host": host}
        if credentials:
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode()
        try:
            with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers), timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    try:
        deadline = time.monotonic() + 300
        while status("127.0.0.1", path="/health") != 200:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "mlflow.log").read_text()[-3000:]
            time.sleep(1)
        assert status("mlflow:5000") == 401  # the service name passes the host guard; auth is asked
        assert status("mlflow:5000", "admin:a-test-password-1234") == 200
        assert status("mlflow:5000", "admin:wrong") == 401
        assert status("evil.example.com:5000", "admin:a-test-password-1234") == 403
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_compose_files_follow_the_compose_spec() -> None:
    schema_file = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        jsonschema.validate(strip_tags(load_compose(name)), schema, cls=jsonschema.Draft202012Validator)


def test_compose_publishes_only_on_loopback_and_checks_every_service() -> None:
    services = load_compose("docker-compose.yml")["services"]
    published = []
    for name, service in services.items():
        assert "healthcheck" in service, f"{name}: no healthcheck"
        assert service.get("network_mode") != "host", name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.rsplit(":", 2)[0] if port.count(":") == 2 else None
            assert host_ip == "127.0.0.1", f"{name}: port {port} is published beyond 127.0.0.1"
            published.append(port)
    assert "127.0.0.1:8265:8265" in services["ray-head"]["ports"]  # dashboard / Jobs API
    assert "127.0.0.1:5000:5000" in services["mlflow"]["ports"]


def test_compose_takes_secrets_from_the_env_file_and_gpus_from_nvidia() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    compose = load_compose("docker-compose.yml")
    services = compose["services"]
    # Secrets only by interpolation from .env, which git ignores; .env.example names each one.
    example = {line.split("=", 1)[0] for line in (REPO / ".env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    referenced = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert referenced <= example, sorted(referenced - example)
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search("PASSWORD|TOKEN|SECRET", key):
                assert str(value).startswith("${"), f"{name}: {key} is written into the file"
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"
    assert services["ray-worker"]["environment"]["RAY_AUTH_MODE"] == "token"
    assert services["ray-head"]["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")
    (device,) = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # The CPU-only override drops exactly that reservation.
    override = load_compose("docker-compose.cpu.yml")["services"]["ray-worker"]
    assert override["deploy"]["!tag"] == "reset"


def test_every_setup_runs_the_image_of_the_pinned_ray() -> None:
    dependency = next(dep for dep in PROJECT["dependencies"] if dep.startswith("ray["))
    assert ray.__version__ in SpecifierSet(dependency.split("]", 1)[1])
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}\n" in dockerfile
    # The default base is Ray's image of that release; a build may name another (BASE_IMAGE, podman).
    assert f"ARG BASE_IMAGE=rayproject/ray:${{RAY_VERSION}}-py{sys.version_info.major}{sys.version_info.minor}\n" in dockerfile
    assert "FROM ${BASE_IMAGE}\n" in dockerfile
    assert '.[cluster]' in dockerfile
    compose = load_compose("docker-compose.yml")
    images = [compose["x-bnew"]["image"], aws()["docker"]["image"]]
    for doc in k8s_documents():
        images += re.findall(r"image: (\S+)", yaml.safe_dump(doc))
    assert len(images) >= 6 and all(image.rsplit("/", 1)[-1] == IMAGE for image in images), images
    assert compose["services"]["postgres"]["image"].startswith("postgres:15.")
    (cluster,) = by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__


def test_kubernetes_manifests_validate() -> None:
    version = kubernetes_validate.latest_version()
    kuberay = json.loads((Path(__file__).parent / "schemas" / "kuberay-v1.json").read_text())
    for doc in k8s_documents():
        if doc["apiVersion"].startswith("ray.io/"):
            jsonschema.validate(doc, kuberay, cls=jsonschema.Draft202012Validator)
            spec = doc["spec"]
            groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]] if doc["kind"] == "RayCluster" else []
            templates = [group["template"] for group in groups] + [spec[k] for k in ("submitterPodTemplate",) if k in spec]
            for template in templates:  # KubeRay's pod templates are Kubernetes' PodTemplateSpec
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                              "template": template}, version, strict=True)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_exposes_nothing_and_reads_secrets_from_the_secret() -> None:
    docs = k8s_documents()
    assert not [doc for doc in docs if doc["kind"] == "Ingress"]
    for service in by_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    (cluster,) = by_kind("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    text = yaml.safe_dump_all(docs)
    assert "hostPort" not in text and "hostNetwork" not in text and "nodePort" not in text
    for group in [head, *cluster["spec"]["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert {"secretRef": {"name": "bnew-sweep"}} in container["envFrom"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    gpu_groups = [group for group in cluster["spec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in group["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups
    (job,) = by_kind("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"]["metadata"]["bnew.kind"] == "sweep"
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    assert any(item["name"] == "RAY_AUTH_TOKEN" and "secretKeyRef" in item["valueFrom"] for item in submitter["env"])
    example = (K8S / "bnew-sweep.env.example").read_text()
    for name in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "BNEW_STORAGE_PATH", "AWS_ACCESS_KEY_ID"):
        assert f"\n{name}=" in example


def test_cluster_launcher_yaml_follows_rays_schema_and_keeps_the_dashboard_local() -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    launcher = aws()
    jsonschema.validate(launcher, schema, cls=jsonschema.Draft7Validator)
    head = shlex.split(segment(launcher["head_start_ray_commands"][-1], "ray start"))
    assert head[head.index("--dashboard-host") + 1] == "127.0.0.1"
    for line in launcher["head_start_ray_commands"][-1:] + launcher["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token" in line and "bnew-sweep.env" in line
    assert launcher["provider"]["type"] == "aws"


def apt_archive(etc: Path, which: str) -> subprocess.CompletedProcess:
    script = f'source {REPO}/cluster/podman/common.sh && apt_archive {which}'
    env = {**os.environ, "APT_ETC": str(etc), "BNEW_PODMAN_CACHE": str(etc / "cache")}
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)


def test_image_build_takes_debians_archives_from_this_machines_apt_sources(tmp_path: Path) -> None:
    """build_images.sh names no mirror of its own: the machine's sources, deb822 or one-line."""
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: trixie trixie-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: trixie-security\nComponents: main\n")
    (tmp_path / "sources.list.d" / "vendor.list").write_text("deb [arch=amd64] https://vendor.example/apt stable-x main\n")
    assert apt_archive(tmp_path, "main").stdout == "http://mirror.example/debian\n"
    assert apt_archive(tmp_path, "security").stdout == "http://mirror.example/debian-security\n"
    (tmp_path / "sources.list.d" / "debian.sources").unlink()
    (tmp_path / "sources.list").write_text("# deb http://old.example/debian bookworm main\n"
                                           "deb http://proxy.example:3142/debian bookworm main contrib\n")
    assert apt_archive(tmp_path, "main").stdout == "http://proxy.example:3142/debian\n"
    missing = apt_archive(tmp_path, "security")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == ("build_images: no Debian security archive in this machine's apt sources; "
                              "set DEBIAN_SECURITY_MIRROR to one\n")
    assert "deb.debian.org" not in (REPO / "cluster" / "podman" / "build_images.sh").read_text()
