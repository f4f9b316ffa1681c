"""A sweep that Tune recorded under the flat layout of `sweeps/` (before its layers) resumes under
the current one: Tune pickles its searcher, schedulers and callbacks by class path, and the old
paths (`sweeps.execute`, `sweeps.console`, `sweeps.tuning`, `sweeps.spec`, `sweeps.plan`) still
name them (import shims kept for one release, README "Architecture"). The fixture was made by the
old code; its README says how."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import ray.cloudpickle
from mlflow import MlflowClient

from tests.servers import sweep_env

FIXTURE = Path(__file__).parent / "fixtures" / "old-layout-sweep.tar.gz"
FOLDER = Path("/tmp/bnew-layout-fixture")
"""Where the old code ran: MLflow's store and Tune's experiment state hold absolute paths."""


def unpack() -> None:
    shutil.rmtree(FOLDER, ignore_errors=True)
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(FOLDER, filter="data")


def test_a_sweep_failed_under_the_old_layout_resumes_and_finishes() -> None:
    unpack()
    env = sweep_env(BNEW_PROJECT_DIR=str(FOLDER))
    result = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "resume", "layout.yaml", "--local",
                             "--max-batches", "2"], cwd=FOLDER, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming Tune experiment" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{FOLDER}/.bnew/mlflow.db")
    experiment = client.get_experiment_by_name("layout")
    runs = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'")
    assert [(run.info.run_name, run.info.status) for run in runs] == [("layout/ste/no_pretrain/seed0", "FINISHED")]
    assert runs[0].data.metrics["epoch"] == 1  # both epochs of its budget


def test_a_searchs_pickled_scheduler_and_callbacks_load() -> None:
    unpack()
    objects = ray.cloudpickle.loads((FOLDER / ".bnew" / "old_tuning_objects.pkl").read_bytes())
    scheduler = objects["scheduler"]
    assert type(scheduler).__name__ == "PerSeed"
    assert type(scheduler.make()).__name__ == "AsyncHyperBandScheduler"  # ASHA; its factory's closure: the spec and template
    assert [type(callback).__name__ for callback in objects["callbacks"]] == ["StoppedEarly", "TuneEvents"]
