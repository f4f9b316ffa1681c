"""Tune storage across nodes: a sweep whose `storage_path` is an S3 bucket (a real S3-compatible
server, moto's server mode, on loopback) survives its driver being killed, and `bnew sweep
resume` finishes it from the checkpoints in the bucket; a Ray cluster on two machines refuses a
local storage folder before any trial starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from servers import free_port, short_temp_dir, stop, sweep_env

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
BUCKET = "sweeps"
BUDGET = 16
"""Quantise epochs (~0.3 s each on a quiet CPU): the driver is killed after the first two."""


def wait_for(condition, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture()
def s3_env(tmp_path: Path):
    """A moto S3 server on a free loopback port, a bucket, and the standard AWS variables that
    pyarrow's S3FileSystem (Tune's storage) and boto3 read."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    env = {
        "AWS_ACCESS_KEY_ID": "bnew-test", "AWS_SECRET_ACCESS_KEY": "bnew-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        wait_for(lambda: server.poll() is None and reachable(port), 60, "moto_server")
        client.create_bucket(Bucket=BUCKET)
        yield env, client
    finally:
        stop(server, timeout=30)
        log.close()


def reachable(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def s3_sweep_env(extra: dict[str, str], project: Path, ray_tmpdir: str) -> dict[str, str]:
    """`servers.sweep_env`, less the caller's AWS settings: the sweep's are moto's, in `extra`."""
    env = sweep_env(**extra, BNEW_PROJECT_DIR=str(project), RAY_TMPDIR=ray_tmpdir)
    return {key: value for key, value in env.items() if not key.startswith("AWS_") or key in extra}


def write_spec(project: Path, storage_path: str) -> Path:
    spec = {
        "name": "s3sweep",
        "axes": {"dataset": ["digits"], "optimiser": ["bnew"], "seed": [0], "budget": [BUDGET]},
        "base": {"batch_size": 64, "device": "cpu"},
        "phases": {"pretrain": {"epochs": 2}},
        "optimisers": {"bnew": {"lambda_rate": 5.0, "freeze_epochs": 1}},
        "max_failures": 0,
        "checkpoint": {"every_epochs": 1},  # Tune's experiment state records the trial after its second epoch
        "storage_path": storage_path,
    }
    path = project / "s3sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def recorded_quantise_epoch(client) -> int | None:
    """The last epoch of the quantise trial that Tune's experiment state in the bucket records
    with a checkpoint (what `Tuner.restore` resumes from), if any."""
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix="tune/s3sweep/").get("Contents", [])
    states = [obj["Key"] for obj in objects if Path(obj["Key"]).name.startswith("experiment_state-")]
    if not states:
        return None
    state = json.loads(client.get_object(Bucket=BUCKET, Key=states[-1])["Body"].read())
    for trial_json, run_json in state["trial_data"]:
        last = json.loads(run_json)["last_result"]
        if json.loads(trial_json)["config"]["stage"]["phase"] == "quantise" and last.get("checkpoint_dir_name"):
            return int(last["epoch"])
    return None


def kill_process_group(process: subprocess.Popen, ray_tmpdir: str) -> None:
    """SIGKILL the driver's process group, and any Ray process of its session left behind."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    leftovers = subprocess.run(["pgrep", "-f", ray_tmpdir], capture_output=True, text=True).stdout.split()
    for pid in map(int, leftovers):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_killed_driver_resumes_from_the_checkpoints_in_the_bucket(s3_env, tmp_path: Path) -> None:
    aws, client = s3_env
    project = tmp_path / "project"
    project.mkdir()
    spec = write_spec(project, f"s3://{BUCKET}/tune")
    ray_tmpdir = short_temp_dir("bnew-ray-")
    env = s3_sweep_env(aws, project, ray_tmpdir)
    command = [str(BIN / "bnew"), "sweep", "{}", str(spec), "--local", "--max-batches", "2"]
    log = (tmp_path / "run.log").open("w")
    driver = subprocess.Popen([part.format("run") for part in command], cwd=project, env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        killed_after = wait_for(lambda: driver.poll() is not None or recorded_quantise_epoch(client), 600,
                                "a quantise checkpoint in the bucket's experiment state")
        assert driver.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        kill_process_group(driver, ray_tmpdir)
        log.close()

    mlflow = MlflowClient(f"sqlite:///{project / '.bnew' / 'mlflow.db'}")
    experiment_id = mlflow.get_experiment_by_name("s3sweep").experiment_id
    runs = {run.data.tags["bnew.stage"]: run for run in mlflow.search_runs([experiment_id], "tags.`bnew.role` = 'trial'")}
    assert runs["pretrain"].info.status == "FINISHED" and runs["quantise"].info.status == "RUNNING"

    resumed = subprocess.run([part.format("resume") for part in command], cwd=project, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming Tune experiment s3://{BUCKET}/tune/s3sweep/" in resumed.stdout
    assert "Traceback" not in resumed.stderr and "ERROR" not in resumed.stderr, resumed.stderr[-3000:]

    trials = mlflow.search_runs([experiment_id], "tags.`bnew.role` = 'trial'")
    assert Counter(run.data.tags["bnew.stage"] for run in trials) == {"pretrain": 1, "quantise": 1}
    by_stage = {run.data.tags["bnew.stage"]: run for run in trials}
    pretrain, quantise = by_stage["pretrain"], by_stage["quantise"]
    # The finished stage was not run again; the interrupted one continued from its checkpoint.
    assert pretrain.info.run_id == runs["pretrain"].info.run_id
    assert pretrain.info.end_time == runs["pretrain"].info.end_time
    assert "bnew.resumed_from_epoch" not in pretrain.data.tags
    assert quantise.info.run_id == runs["quantise"].info.run_id and quantise.info.status == "FINISHED"
    assert int(quantise.data.tags["bnew.resumed_from_epoch"]) >= killed_after + 1
    for run, epochs in ((pretrain, 2), (quantise, BUDGET)):
        steps = [metric.step for metric in mlflow.get_metric_history(run.info.run_id, "loss")]
        assert sorted(steps) == list(range(epochs)), steps  # every epoch logged exactly once

    keys = [obj["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="tune/s3sweep/")
            for obj in page.get("Contents", [])]
    quantise_checkpoints = {Path(key).parent.name for key in keys if "_bnew_" in key and key.endswith("/checkpoint.pt")}
    # Tune keeps the trial's last two checkpoints in the bucket, written after the resume.
    assert len(quantise_checkpoints) == 2, quantise_checkpoints
    assert min(int(name.removeprefix("checkpoint_")) for name in quantise_checkpoints) > killed_after, quantise_checkpoints
    assert not (project / ".bnew" / "ray_results").exists()  # nothing went to a local folder


def start_ray_node(args: list[str], env: dict[str, str], log: Path) -> None:
    started = subprocess.run([str(BIN / "ray"), "start", *args, "--disable-usage-stats"], env=env,
                             stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=180)
    assert started.returncode == 0, log.read_text()[-3000:]


def test_cluster_on_two_machines_refuses_a_local_storage_folder(tmp_path: Path) -> None:
    # Two "machines" on loopback: the head on 127.0.0.1, a worker node on 127.0.0.2.
    state, project = tmp_path / "cluster", tmp_path / "project"
    state.mkdir()
    project.mkdir()
    port = free_port()
    ray_tmpdir = short_temp_dir("bnew-ray-")
    (state / "ray_tmpdir").write_text(ray_tmpdir)
    (state / "ray_port").write_text(str(port))
    token = state / "ray_auth_token"
    token.write_text(os.urandom(32).hex())
    env = s3_sweep_env({"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)},
                       project, ray_tmpdir)
    try:
        start_ray_node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                        "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
                        "--temp-dir", ray_tmpdir], env, state / "head.log")
        start_ray_node(["--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.2", "--num-cpus", "1"],
                       env, state / "worker.log")
        spec = write_spec(project, str(tmp_path / "not-shared"))
        refused = subprocess.run([str(BIN / "bnew"), "sweep", "run", str(spec), "--max-batches", "2"], cwd=project,
                                 env=env, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["bash", str(REPO / "cluster" / "stop_local.sh"), str(state)], timeout=120)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    # Ray names a node on 127.0.0.1 by the machine's own address; the other one is 127.0.0.2.
    assert line.startswith("error: storage_path: ") and "on 2 machines" in line and "127.0.0.2" in line
    assert "s3://" in line and "BNEW_STORAGE_SHARED=1" in line
    assert "Traceback" not in refused.stderr
    mlflow = MlflowClient(f"sqlite:///{project / '.bnew' / 'mlflow.db'}")
    experiment_id = mlflow.get_experiment_by_name("s3sweep").experiment_id
    assert mlflow.search_runs([experiment_id], "tags.`bnew.role` = 'trial'") == []  # no trial started
    assert not (tmp_path / "not-shared").exists()
