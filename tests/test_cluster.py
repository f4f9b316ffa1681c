"""A real loopback cluster (Ray head + two worker nodes as separate processes, an MLflow
server that serves artifacts): a sweep runs on it and every result lands on the server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture()
def cluster(tmp_path: Path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WORKERS": "2", "CPUS_PER_NODE": "1",
           "RAY_PORT": "6391", "MLFLOW_PORT": "5056"}
    state = tmp_path / "cluster"
    started = subprocess.run(["bash", str(REPO / "cluster" / "start_local.sh"), str(state)], env=env,
                             capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        yield {**env, **exports}
    finally:
        subprocess.run(["bash", str(REPO / "cluster" / "stop_local.sh"), str(state)], env=env, timeout=120)


def test_sweep_on_loopback_cluster_logs_through_the_server(cluster: dict, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    project.mkdir()
    env = {**cluster, "BNEW_PROJECT_DIR": str(project), "BNEW_STORAGE_PATH": str(tmp_path / "shared-storage")}
    run = subprocess.run([str(BIN / "bnew"), "sweep", "run", "demo", "--max-epochs", "1", "--max-batches", "2"],
                         cwd=project, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "12 stages trained" in run.stdout

    client = MlflowClient(cluster["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("demo")
    trials = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'", max_results=100)
    assert len(trials) == 12 and all(t.info.status == "FINISHED" for t in trials)
    for trial in trials:
        # Artifacts went through the server, not to a path on the worker.
        assert trial.info.artifact_uri.startswith("mlflow-artifacts:"), trial.info.artifact_uri
        assert "model.pt" in {a.path for a in client.list_artifacts(trial.info.run_id)}
    assert not (project / ".bnew" / "mlflow.db").exists()
    assert (tmp_path / "shared-storage").is_dir()
