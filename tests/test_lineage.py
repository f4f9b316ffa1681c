"""MLflow lineage of a sweep, read back through the MLflow client: experiment kind, axis params,
source tags, the parent's note, the dataset input, input-model links, the logged model (its
logits equal those of model.pt) and each trial's `logs/trial.log`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from sweeps.records.lineage import load_trainer_model, log_final_model
from tests.servers import sweep_env

SPEC = """\
name: lineage
description: BNEW, traced
axes:
  dataset: [digits]
  optimiser: [bnew]
  seed: [0]
  budget: [2]
  distillation: [true]
  params: {optimiser.lambda_rate: [5.0]}
base: {batch_size: 32, device: cpu}
phases:
  teacher: {epochs: 1}
  pretrain: {epochs: 1}
"""


def git_head() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, Path]:
    """A debug sweep (no Ray): teacher, pretrain and a quantise trial, 1 epoch of 2 batches each."""
    cwd = tmp_path_factory.mktemp("lineage")
    (cwd / "lineage.yaml").write_text(SPEC)
    env = sweep_env()
    result = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "run", "lineage.yaml", "--debug",
                             "--max-epochs", "1", "--max-batches", "2"], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return MlflowClient(f"sqlite:///{cwd / '.bnew' / 'mlflow.db'}"), cwd


def runs_by_name(client: MlflowClient) -> dict[str, mlflow.entities.Run]:
    experiment = client.get_experiment_by_name("lineage")
    return {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}


def test_experiment_opens_on_training_runs_and_the_parent_carries_the_note(swept) -> None:
    client, _ = swept
    experiment = client.get_experiment_by_name("lineage")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = runs_by_name(client)["lineage"]
    assert parent.data.tags["mlflow.note.content"] == "BNEW, traced"
    assert parent.data.tags["mlflow.source.git.commit"] == git_head()


def test_axes_are_params_and_runs_carry_source_tags_and_dataset(swept) -> None:
    client, _ = swept
    runs = runs_by_name(client)
    trial = runs["lineage/bnew/baseline/seed0"]
    params = trial.data.params
    assert params["axis.optimiser"] == "bnew" and params["axis.seed"] == "0" and params["axis.ablation"] == "baseline"
    assert params["axis.budget"] == "1" and params["axis.distillation"] == "yes" and params["axis.dataset"] == "digits"
    assert params["axis.optimiser.lambda_rate"] == "5.0" and params["optimiser.lambda_rate"] == "5.0"
    for run in runs.values():
        tags = run.data.tags
        assert tags["mlflow.source.git.commit"] == git_head(), run.info.run_name
        assert tags["mlflow.source.name"].startswith("bnew sweep run lineage.yaml")
        assert tags["mlflow.user"]
        if run.info.run_name == "lineage":
            continue
        (dataset,) = [item.dataset for item in run.inputs.dataset_inputs]
        assert dataset.name == "digits" and len(dataset.digest) == 16 and "load_digits" in dataset.source


def test_quantise_trials_link_their_pretrain_and_teacher_runs(swept) -> None:
    client, _ = swept
    runs = runs_by_name(client)
    teacher, pretrain = runs["lineage/teacher/baseline/seed0"], runs["lineage/pretrain/baseline/seed0"]
    assert pretrain.data.tags["bnew.teacher_run_id"] == teacher.info.run_id
    tags = runs["lineage/bnew/baseline/seed0"].data.tags
    assert tags["bnew.pretrain_run_id"] == pretrain.info.run_id and tags["bnew.teacher_run_id"] == teacher.info.run_id


def test_logged_model_loads_with_the_logits_of_model_pt_and_the_log_is_an_artifact(
    swept, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = swept
    trial = runs_by_name(client)["lineage/bnew/baseline/seed0"]
    run_id = trial.info.run_id
    (model_output,) = client.get_run(run_id).outputs.model_outputs
    logged = client.get_logged_model(model_output.model_id)
    assert logged.source_run_id == run_id and logged.status.to_proto() == mlflow.entities.LoggedModelStatus.READY.to_proto()
    assert {metric.key for metric in logged.metrics} >= {"test_acc_binary", "loss"}
    assert next(m.value for m in logged.metrics if m.key == "test_acc_binary") == trial.data.metrics["test_acc_binary"]

    # Not mlflow.set_tracking_uri: it also sets MLFLOW_TRACKING_URI for the rest of the test session.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    network = mlflow.pytorch.load_model(f"models:/{logged.model_id}").eval()
    trainer_model = load_trainer_model(Path(client.download_artifacts(run_id, "model.pt", str(tmp_path))))
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(network(images), trainer_model(images))

    log = Path(client.download_artifacts(run_id, "logs/trial.log", str(tmp_path))).read_text()
    assert log.startswith("--- ") and "pid" in log.splitlines()[0]

    # A retry of the trial (its run failed after the model was logged) logs no second model.
    model_pt = Path(client.download_artifacts(run_id, "model.pt", str(tmp_path / "retry")))
    assert log_final_model(client, trial.info.experiment_id, run_id, model_pt, model_output.step, "quantise") == logged.model_id
    assert len(client.get_run(run_id).outputs.model_outputs) == 1
    assert len(client.search_logged_models([trial.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")) == 1
