"""Sweeps as Ray jobs on a real loopback cluster (`cluster/start_local.sh`: a Ray head with the
dashboard / Jobs API, two worker nodes, Ray token auth, an `mlflow server` with basic auth on
PostgreSQL). `bnew` runs as a separate process that knows only the addresses and credentials the
script printed. Also: one-line refusals before anything is submitted, and dataset roots."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.servers import free_port

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
CIFAR10_JPEG = [REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz", Path("/work/shared/data/cifar10-jpeg.tar.gz")]
"""Where the shared CIFAR-10 JPEG archive lies next to a checkout (`../shared/data`)."""


def bnew(*args: str, env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "bnew"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def no_traceback(result: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in result.stdout + result.stderr


# --- refusals and checks that need no cluster ----------------------------------------------------
def test_malformed_spec_is_refused_before_anything_is_submitted(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\naxes: {optimiser: [ste, adamw]}\n")
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    # The address answers nothing: a submission attempt would fail with a different message.
    result = bnew("sweep", "submit", str(spec), "--address", "http://127.0.0.1:9", env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "axes.optimiser" in result.stderr and no_traceback(result)


def test_submit_refuses_a_tracking_store_on_this_machine(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(tmp_path)}
    result = bnew("sweep", "submit", "demo", "--address", "http://127.0.0.1:9", env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: tracking_uri: sqlite:///") and result.stderr.count("\n") == 1


def test_a_loopback_tracking_uri_is_not_sent_to_another_machine(tmp_path: Path) -> None:
    """Behind an SSH tunnel the laptop's `localhost:5000` is not the server the cluster's nodes reach."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(tmp_path),
           "MLFLOW_TRACKING_URI": "http://localhost:5000"}
    result = bnew("sweep", "submit", "demo", "--address", "http://10.255.255.1:8265", env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: --tracking-uri: http://localhost:5000 names this machine but the cluster "
                                    "at http://10.255.255.1:8265 is another")
    from sweeps.run.jobs import cluster_tracking_uri

    assert cluster_tracking_uri("http://localhost:5000", "http://mlflow:5000", "http://head:8265") == "http://mlflow:5000"
    assert cluster_tracking_uri("http://127.0.0.1:5000", None, "http://127.0.0.1:8265") == "http://127.0.0.1:5000"


def test_missing_dataset_root_is_one_line_before_ray_starts(tmp_path: Path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "nodata", "axes": {"dataset": ["imagefolder"], "optimiser": ["ste"]},
                                    "datasets": {"imagefolder": {"root": "data/missing"}}}))
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(tmp_path),
           "BNEW_DATA_DIR": str(tmp_path / "mounted")}
    result = bnew("sweep", "run", str(spec), "--local", env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (f"error: datasets.imagefolder.root: {tmp_path}/mounted/data/missing/train is not a "
                             f"directory (relative roots are read from BNEW_DATA_DIR, here {tmp_path}/mounted)\n")
    assert not (tmp_path / ".bnew").exists()  # no MLflow store, no Tune folder: nothing started


def test_version_mismatch_is_one_line_naming_both_sides() -> None:
    from sweeps.run.jobs import version_mismatch

    here = {"ray": "2.60.0", "bnew-sweep": "0.1.0"}
    assert version_mismatch(here, dict(here)) is None
    line = version_mismatch(here, {"ray": "2.60.0", "bnew-sweep": "0.2.0"})
    assert line is not None and "\n" not in line
    assert "bnew-sweep 0.1.0 here, 0.2.0 on the cluster" in line and "ray" not in line.replace("bnew-sweep", "")


# --- the loopback cluster ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[dict[str, str]]:
    """The cluster's printed environment (addresses, Ray token path, MLflow credentials)."""
    # PostgreSQL runs as user postgres, which cannot enter pytest's private temp folder.
    state = Path(tempfile.mkdtemp(prefix="bnew-cluster-"))
    state.chmod(0o755)
    ports = {name: str(free_port()) for name in ("RAY_PORT", "DASHBOARD_PORT", "RAY_CLIENT_PORT", "MLFLOW_PORT", "PG_PORT")}
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WORKERS": "2", "CPUS_PER_NODE": "1",
           "MLFLOW_BACKEND": "postgres", "BNEW_STORAGE_PATH": str(state / "shared-storage"), **ports}
    monkeypatch = pytest.MonkeyPatch()
    try:
        # Its own process group: a timed-out start must not leave a `ray start` running past stop_local.sh.
        starting = subprocess.Popen(["bash", str(REPO / "cluster" / "start_local.sh"), str(state)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = starting.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(starting.pid, signal.SIGKILL)
            raise
        started = subprocess.CompletedProcess(starting.args, starting.returncode, stdout, stderr)
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(name, exports[name])  # for this process's MlflowClient
        yield exports
    finally:
        monkeypatch.undo()
        subprocess.run(["bash", str(REPO / "cluster" / "stop_local.sh"), str(state)], env=env, timeout=120)
    shutil.rmtree(state, ignore_errors=True)  # kept, with its logs, when the cluster did not start


def client_env(cluster: dict[str, str], home: Path) -> dict[str, str]:
    """A laptop's view: the Jobs API address, the Ray token, MLflow's address and credentials."""
    env = {key: value for key, value in cluster.items() if key != "RAY_ADDRESS"}
    return {**env, "PATH": f"{BIN}:/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "HOME": str(home)}


def submitted_job(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"submitted job (\S+)", result.stdout)
    assert match, result.stdout
    return match.group(1)


def experiment_runs(name: str, deleted_too: bool = False) -> list:
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    view = ViewType.ALL if deleted_too else ViewType.ACTIVE_ONLY
    return client.search_runs([experiment.experiment_id], max_results=1000, run_view_type=view) if experiment else []


def described_runs(runs: list) -> str:
    """One line per run, for a failed assertion: name, state, lifecycle stage, end time, bnew.* tags."""
    return "\n".join(
        f"{run.info.run_name} {run.info.status} {run.info.lifecycle_stage} end={run.info.end_time} "
        f"{ {key: value for key, value in sorted(run.data.tags.items()) if key.startswith('bnew.')} }"
        for run in runs
    )


@pytest.mark.slow
@pytest.mark.debian("postgresql")  # the cluster's MLflow store
def test_submitted_demo_runs_on_every_worker_node(cluster: dict[str, str], tmp_path: Path) -> None:
    from mlflow import MlflowClient

    env = client_env(cluster, tmp_path)
    # Stages of 3 full digits epochs (seconds each): two run at once, so both nodes train. Sub-second
    # stages could all follow each other on one node's reused actor.
    submitted = bnew("sweep", "submit", "demo", "--max-epochs", "3", env=env, cwd=tmp_path)
    job = submitted_job(submitted)
    # The experiment is the job's driver's to create: the laptop never creates one to link it.
    assert re.search(r"MLflow: experiment 'demo' at http://127\.0\.0\.1:\d+ \(the job's driver creates it\)",
                     submitted.stdout)
    assert f"bnew sweep logs {job} --follow" in submitted.stdout and "versions differ" not in submitted.stderr

    followed = bnew("sweep", "logs", job, "--follow", env=env, cwd=tmp_path)
    assert followed.returncode == 0 and f"job {job}: SUCCEEDED" in followed.stdout, followed.stdout[-3000:]
    assert "sweep demo: 12 stages trained, 0 reused" in followed.stdout
    assert "sweep demo: 12 stages trained" in bnew("sweep", "logs", job, env=env, cwd=tmp_path).stdout
    listed = bnew("sweep", "jobs", env=env, cwd=tmp_path)
    assert re.search(rf"{job}\s.*demo\s.*SUCCEEDED", listed.stdout), listed.stdout

    client = MlflowClient()
    trials = [run for run in experiment_runs("demo") if run.data.tags.get("bnew.role") == "trial"]
    assert len(trials) == 12 and {run.info.status for run in trials} == {"FINISHED"}
    for trial in trials:
        assert "loss" in trial.data.metrics and "final_test_acc_binary" in trial.data.metrics
        assert "model.pt" in {artifact.path for artifact in client.list_artifacts(trial.info.run_id)}
    assert len({run.data.tags["bnew.node"] for run in trials}) >= 2  # both worker nodes trained

    with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no MLflow
        urllib.request.urlopen(f"{cluster['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1")
    assert refused.value.code == 401


def shared_pretrain_spec(name: str, optimisers: list[str]) -> dict:
    """Digits sweeps with the same pretrained models (seeds 0 and 1) and their own quantise trials."""
    return {"name": name, "axes": {"dataset": ["digits"], "optimiser": optimisers, "seed": [0, 1], "budget": [2]},
            "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": 3}}, "resources": {"cpu": 1}}


@pytest.mark.slow
@pytest.mark.debian("postgresql")  # the cluster's MLflow store
def test_two_submissions_sharing_pretrained_models_train_each_once(cluster: dict[str, str], tmp_path: Path) -> None:
    """Submitted at the same moment, two sweeps need the same two pretrained models: each is trained
    once (the other sweep waits on its lease and links the run), and both sweeps finish."""
    env = client_env(cluster, tmp_path)
    jobs = []
    for name, optimisers in (("shared-a", ["ste", "bop"]), ("shared-b", ["bnew", "bmd"])):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(shared_pretrain_spec(name, optimisers)))
        jobs.append(submitted_job(bnew("sweep", "submit", str(tmp_path / f"{name}.yaml"), "--max-batches", "8",
                                       env=env, cwd=tmp_path)))
    logs = [bnew("sweep", "logs", job, "--follow", env=env, cwd=tmp_path) for job in jobs]
    for job, followed in zip(jobs, logs):
        assert followed.returncode == 0 and f"job {job}: SUCCEEDED" in followed.stdout, followed.stdout[-3000:]
    pretrains = {name: [run for run in experiment_runs(name) if run.data.tags.get("bnew.stage") == "pretrain"]
                 for name in ("shared-a", "shared-b")}
    # Every pretrain run, deleted ones (a waiter's, once it linked) too, and the end of both jobs' logs.
    story = "\n".join([described_runs([run for name in pretrains for run in experiment_runs(name, deleted_too=True)
                                       if run.data.tags.get("bnew.stage") == "pretrain"]),
                       *(followed.stdout[-2000:] for followed in logs)])
    keys = {run.data.tags["bnew.stage_key"] for runs in pretrains.values() for run in runs}
    assert len(keys) == 2, story  # seeds 0 and 1, shared by both sweeps
    for key in keys:
        trained = [run for runs in pretrains.values() for run in runs if run.data.tags["bnew.stage_key"] == key
                   and run.info.status == "FINISHED" and "bnew.reused_from" not in run.data.tags]
        assert len(trained) == 1, story
    # Each sweep holds one run per pretrained model, trained or linked, and it is FINISHED: a waiter's
    # own run is deleted once it links, a retried attempt continues its run, and a link cut short is
    # deleted by the retry's link (tests/test_shared_stages.py).
    for runs in pretrains.values():
        assert sorted((run.data.tags["bnew.stage_key"], run.info.status) for run in runs) == [
            (key, "FINISHED") for key in sorted(keys)], story
    for name in ("shared-a", "shared-b"):  # and both reports read their own four trials
        quantised = [run for run in experiment_runs(name) if run.data.tags.get("bnew.stage") == "quantise"]
        assert len(quantised) == 4 and {run.info.status for run in quantised} == {"FINISHED"}


STOPPABLE_SPEC = {
    "name": "stoppable", "axes": {"dataset": ["digits"], "optimiser": ["ste", "bnew"], "budget": [30]},
    "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": 1}},
    "optimisers": {"bnew": {"lambda_rate": 5.0}}, "resources": {"cpu": 1},
}
"""A pretrain that finishes at once, then two 30-epoch quantise trials to stop in the middle."""


@pytest.mark.slow
@pytest.mark.debian("postgresql")  # the cluster's MLflow store
def test_stopped_job_leaves_no_run_running_and_resubmission_trains_only_the_rest(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    env = client_env(cluster, tmp_path)
    spec = tmp_path / "stoppable.yaml"
    spec.write_text(yaml.safe_dump(STOPPABLE_SPEC))
    job = submitted_job(bnew("sweep", "submit", str(spec), "--max-batches", "4", env=env, cwd=tmp_path))
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # until a quantise trial is training
        training = [run for run in experiment_runs("stoppable") if run.data.tags.get("bnew.stage") == "quantise"
                    and run.info.status == "RUNNING" and "loss" in run.data.metrics]
        if training:
            break
        time.sleep(1)
    assert training, bnew("sweep", "logs", job, env=env, cwd=tmp_path).stdout[-3000:]

    stopped = bnew("sweep", "stop", job, env=env, cwd=tmp_path)
    assert stopped.returncode == 0 and f"job {job}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    runs = experiment_runs("stoppable")
    assert "RUNNING" not in {run.info.status for run in runs}, [(r.info.run_name, r.info.status) for r in runs]
    assert "KILLED" in {run.info.status for run in runs if run.data.tags.get("bnew.stage") == "quantise"}
    finished_before = {run.data.tags["bnew.stage_key"] for run in runs
                       if run.info.status == "FINISHED" and run.data.tags.get("bnew.role") == "trial"}
    assert finished_before  # the pretrain at least

    again = submitted_job(bnew("sweep", "submit", str(spec), "--max-batches", "4", env=env, cwd=tmp_path))
    followed = bnew("sweep", "logs", again, "--follow", env=env, cwd=tmp_path)
    assert f"job {again}: SUCCEEDED" in followed.stdout, followed.stdout[-3000:]
    assert f"{len(finished_before)} stages reused, {3 - len(finished_before)} to train" in followed.stdout
    trials = [run for run in experiment_runs("stoppable") if run.data.tags.get("bnew.role") == "trial"]
    trained = [run for run in trials if run.info.status == "FINISHED" and "bnew.reused_from" not in run.data.tags]
    assert sorted(run.data.tags["bnew.stage_key"] for run in trained) == sorted({r.data.tags["bnew.stage_key"] for r in trials})


def cifar_subset(root: Path, classes: int = 3, train: int = 40, test: int = 10) -> None:
    """A few classes and images of the shared CIFAR-10 JPEGs as `root/{train,test}/<class>/*.jpg`."""
    archive = next((path for path in CIFAR10_JPEG if path.is_file()), None)
    if archive is None:
        pytest.skip(f"the shared CIFAR-10 JPEG archive is not at {CIFAR10_JPEG[0]}")
    wanted = {"train": train, "test": test}
    taken: dict[tuple[str, str], int] = {}
    chosen: list[str] = []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3 or parts[0] not in wanted:
                continue
            split, label = parts[0], parts[1]
            if label not in chosen and len(chosen) < classes:
                chosen.append(label)
            if label in chosen and taken.get((split, label), 0) < wanted[split]:
                target = root / split / label / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                taken[(split, label)] = taken.get((split, label), 0) + 1
            if len(taken) == 2 * classes and all(taken[key] == wanted[key[0]] for key in taken):
                return


@pytest.mark.slow
@pytest.mark.debian("postgresql")  # the cluster's MLflow store
def test_table2_shaped_spec_reads_a_relative_data_directory_on_the_cluster(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """paper-table2's shape (teacher, pretrain and quantise with distillation, `root:` relative to
    the project) on an image folder; the driver runs here, the trials in Tune's own folders."""
    from mlflow import MlflowClient

    cifar_subset(tmp_path / "data" / "cifar-small")
    table2 = yaml.safe_load((REPO / "sweeps" / "presets" / "paper-table2.yaml").read_text())
    spec = {**table2, "name": "table2-small", "exclude": [], "include": [],
            "axes": {**table2["axes"], "dataset": ["imagefolder"], "optimiser": ["bnew"], "ablation": ["baseline"],
                     "seed": [0]},
            "datasets": {"imagefolder": {"root": "data/cifar-small", "val_size": 0}},
            "base": {"batch_size": 16, "device": "cpu"}, "resources": {"cpu": 1}}
    (tmp_path / "table2-small.yaml").write_text(yaml.safe_dump(spec))
    env = {**client_env(cluster, tmp_path), "RAY_ADDRESS": cluster["RAY_ADDRESS"], "BNEW_PROJECT_DIR": str(tmp_path)}
    run = bnew("sweep", "run", "table2-small.yaml", "--max-epochs", "1", "--max-batches", "2", env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "3 stages trained" in run.stdout and no_traceback(run)

    trials = [run for run in experiment_runs("table2-small") if run.data.tags.get("bnew.role") == "trial"]
    assert sorted(run.data.tags["bnew.stage"] for run in trials) == ["pretrain", "quantise", "teacher"]
    for trial in trials:
        assert trial.info.status == "FINISHED"
        assert trial.data.params["data.root"] == str(tmp_path / "data" / "cifar-small")
        assert "model.pt" in {artifact.path for artifact in MlflowClient().list_artifacts(trial.info.run_id)}
