"""Where a sweep's results come from, in MLflow's own terms, so its UI can show and compare them:
the experiment kind, axes as
params (the compare and parallel-coordinates views plot params only), source tags (commit,
command, user), the spec's description as the parent run's note, the dataset as a run input,
every trial's final network as an MLflow logged model, and the runs a trial took its input
models from.

Everything goes through an explicit `MlflowClient`, like `sweeps.records.tracker`."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from mlflow import MlflowClient
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelOutput,
    LoggedModelStatus,
    Metric,
    Param,
    Run,
    RunTag,
)

from bnew_core.config import build_trial_config
from sweeps.core.plan import Role, Stage
from sweeps.core.schema import AXES, PARAM_TAG_PREFIX, axis_tag

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""The experiment's kind, as MLflow's UI sets it from its kind selector. MLflow 3.17.2's UI
does not read it for the landing page (see `sweeps.records.links`); the tag still says what the
experiment holds."""
TRAINING_KIND = "custom_model_development"
NOTE_TAG = "mlflow.note.content"
AXIS_PARAM_PREFIX = "axis."
"""Axis params are `axis.optimiser`, `axis.optimiser.lambda_rate`...: the config's own params
(`optimiser.name`, `seed`) are logged already and MLflow params cannot change."""
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit", "mlflow.user")
INPUT_RUN_TAGS = {"init_checkpoint": "bnew.pretrain_run_id", "teacher_checkpoint": "bnew.teacher_run_id"}
"""Trial config field of an input model -> tag holding the run id that trained it."""
MODEL_NAME = "model"
MODEL_METRICS = ("test_acc_binary", "test_acc_float", "train_acc", "loss")
"""The last epoch's metrics linked to the logged model (one history request each)."""
DATA_SOURCES = {"digits": "bnew_core.data.load_digits", "synthetic": "bnew_core.data.load_synthetic"}
TRAIN_CONTEXT = InputTag("mlflow.data.context", "train")


def driver_source_tags(command: str) -> dict[str, str]:
    """MLflow's source tags for this driver process: its command, user and the git commit of
    the code it runs (computed once here, passed to every trial in the sweep context)."""
    tags = {
        "mlflow.source.name": command,
        "mlflow.source.type": "LOCAL",
        "mlflow.user": getpass.getuser(),
    }
    code_dir = Path(__file__).resolve().parents[2]
    try:
        found = subprocess.run(["git", "-C", str(code_dir), "rev-parse", "HEAD"], capture_output=True, text=True)
    except FileNotFoundError:  # no git on this node (an image without it): the commit is then unknown
        return tags
    if found.returncode == 0:
        tags["mlflow.source.git.commit"] = found.stdout.strip()
    return tags


def driver_command() -> str:
    """The command line as the user typed it (`bnew sweep run demo --local`)."""
    return " ".join(["bnew", *sys.argv[1:]])


def record_sweep(client: MlflowClient, experiment_id: str, parent_run_id: str, description: str,
                 source_tags: dict[str, str]) -> None:
    """Experiment kind, and the parent run's note and source tags."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    for key, value in {**source_tags, NOTE_TAG: description}.items():
        client.set_tag(parent_run_id, key, value)


def record_sweep_datasets(client: MlflowClient, parent_run_id: str, stages: Iterable[Stage]) -> None:
    """The datasets of the sweep's stages, as inputs of its parent run, before any trial starts.

    MLflow's SQL store adds a dataset to an experiment by looking it up, then inserting it: of
    two trials that log the same new dataset at once, one can lose with the store's unique-key
    error (BAD_REQUEST, which MLflow's client does not retry) and fail its attempt. Added here
    first, the dataset is one the experiment's trials and links find, and none of them inserts it."""
    datasets = {(dataset.name, dataset.digest): dataset for dataset in map(dataset_entity, stages)}
    if datasets:
        client.log_inputs(parent_run_id, datasets=[DatasetInput(dataset, tags=[TRAIN_CONTEXT])
                                                   for dataset in datasets.values()])


def axis_params(role: Role) -> list[Param]:
    """The role's axes (`bnew.optimiser`, `bnew.param.optimiser.lambda_rate`) as `axis.*` params."""
    axes = {axis: role.tags[axis_tag(axis)] for axis in AXES if axis_tag(axis) in role.tags}
    axes.update({tag.removeprefix(PARAM_TAG_PREFIX): value for tag, value in role.tags.items()
                 if tag.startswith(PARAM_TAG_PREFIX)})
    return [Param(AXIS_PARAM_PREFIX + axis, value) for axis, value in axes.items()]


def dataset_entity(stage: Stage) -> Dataset:
    """The stage's dataset, named and digested from its data settings (cheap: nothing is read)."""
    data = stage.config["data"]
    settings = {key: value for key, value in data.items() if key not in ("root", "download")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    source = DATA_SOURCES.get(data["name"], str(data.get("root") or data["name"]))
    return Dataset(name=data["name"], digest=digest, source_type="code" if data["name"] in DATA_SOURCES else "local",
                   source=json.dumps({"uri": source}), profile=json.dumps(settings, sort_keys=True))


def record_trial(client: MlflowClient, run_id: str, stage: Stage, role: Role, source_tags: dict[str, str],
                 input_runs: dict[str, str], tags: dict[str, str] | None = None) -> None:
    """A trial run's axis params, source tags, input-model runs and other `tags` in one request,
    then its dataset input.

    `input_runs`: trial config field (init_checkpoint, teacher_checkpoint) -> run id that trained it.
    Safe to repeat on a retried run: same params, same dataset, same tags."""
    tags = {**source_tags, **{INPUT_RUN_TAGS[field]: run for field, run in input_runs.items()}, **(tags or {})}
    client.log_batch(run_id, params=axis_params(role), tags=[RunTag(key, value) for key, value in tags.items()])
    client.log_inputs(run_id, datasets=[DatasetInput(dataset_entity(stage), tags=[TRAIN_CONTEXT])])


def record_reused(client: MlflowClient, source: Run, run_id: str, role: Role) -> None:
    """A role linked to a run that trained its stage: its own axes, the trainer's source tags."""
    client.log_batch(run_id, params=axis_params(role),
                     tags=[RunTag(key, source.data.tags[key]) for key in SOURCE_TAGS if key in source.data.tags])
    if source.inputs is not None and source.inputs.dataset_inputs:
        client.log_inputs(run_id, datasets=list(source.inputs.dataset_inputs))


def load_trainer_model(path: Path) -> Any:
    """The network saved in a trainer `model.pt`, in eval mode."""
    from bnew_core.models import load_trained  # heavy: torch, for the driver's commands that never log a model

    return load_trained(path).network


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def final_model_uris(client: MlflowClient, experiment_ids: list[str]) -> dict[str, str]:
    """Run id -> `models:/<id>` of its READY final model, for the runs of `experiment_ids`
    (what `mlflow.pytorch.load_model` takes)."""
    uris: dict[str, str] = {}
    page_token = None
    while experiment_ids:
        page = client.search_logged_models(experiment_ids, filter_string=f"name = '{MODEL_NAME}'",
                                           max_results=1000, page_token=page_token)
        uris.update({model.source_run_id: f"models:/{model.model_id}" for model in page
                     if model.status == LoggedModelStatus.READY})
        page_token = page.token
        if not page_token:
            break
    return uris


def log_final_model(client: MlflowClient, experiment_id: str, run_id: str, model_path: Path, step: int,
                    phase: str) -> str:
    """The trial's final network as an MLflow logged model of the run, linked to the run's
    metrics of its last epoch `step` (logged again with the model id and their own timestamps,
    as `mlflow.<flavor>.log_model` links them: the store keeps one value). Returns its id.

    The model turns READY last, once linked, so a retried trial (its run failed after this, or
    during it) keeps a READY model of its run and logs none again: one final model per run."""
    import mlflow.pytorch  # heavy: torch
    import torch  # heavy
    from mlflow.models import Model

    earlier = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'")
    ready = [model for model in earlier if model.status == LoggedModelStatus.READY]
    if ready:
        return ready[0].model_id
    for unfinished in earlier:  # its upload or linking was cut short
        client.delete_logged_model(unfinished.model_id)
    model = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id,
                                       model_type=f"bnew-{phase}", tags={"bnew.model_file": "model.pt"})
    with tempfile.TemporaryDirectory() as directory:
        local = Path(directory) / MODEL_NAME
        metadata = Model(artifact_path=model.artifact_location, run_id=run_id, model_id=model.model_id,
                         model_uuid=model.model_id)
        # Explicit requirements: inferring them would import the model in a subprocess. Pickle,
        # not pt2 (torch.export needs an input example); MLflow's warning about it is not news.
        with quiet_logger("mlflow.pytorch"):
            mlflow.pytorch.save_model(load_trainer_model(model_path), str(local), mlflow_model=metadata,
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                      serialization_format="pickle")
        client.log_model_artifacts(model.model_id, str(local))
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
    linked = [
        Metric(metric.key, metric.value, metric.timestamp, metric.step, run_id=run_id, model_id=model.model_id)
        for key in MODEL_METRICS
        for metric in client.get_metric_history(run_id, key)
        if metric.step == step and metric.model_id is None
    ]
    client.log_batch(run_id, metrics=linked)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id
