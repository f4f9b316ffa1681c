"""Exported networks (`bnew export`, `bnew sweep export`) in MLflow: which trial runs of a sweep
to export (every finished quantise trial, or the best of each cell), the `model.pt` a run holds,
and the exported files logged back to that run under `export/` with their sizes as metrics, so
the model's bytes sit beside its accuracy.

A trial run linked to another sweep's run (`bnew.reused_from`) holds no artifacts: its model, and
so its export, is the run that trained it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException

from bnew_core.config import BnewError
from sweeps.core.schema import REUSED_FROM_TAG, axis_tag, cell_of
from sweeps.records.tracker import Tracker

EXPORT_FOLDER = "export"
"""Artifact folder of a run that holds its exported network."""
MODEL_FILE = "model.pt"
ACCURACY_METRIC = "final_test_acc_binary"
"""What `--best` ranks a cell's trials by (logged when a trial finishes)."""
BINARY_WEIGHTS_METRIC = "export_binary_weight_bytes"
"""Bytes the exported binary weights take at 1 bit each (float32 would take 32 times as many)."""


def size_metric(file_name: str) -> str:
    """The metric of an exported file's size: `export_model_bin_bytes` for model.bin."""
    return f"export_{file_name.replace('.', '_')}_bytes"


@dataclass
class ExportTarget:
    """A trial whose network is exported."""

    name: str
    """The trial run's name (`table2/bnew/no_prelu/seed3`): the export's folder under --out."""
    run_id: str
    """The run holding its model.pt: its own, or the run it reused."""
    accuracy: float | None


def model_run_id(run: Run) -> str:
    """The run holding the trial's model.pt and export: the run it reused, else its own."""
    return run.data.tags.get(REUSED_FROM_TAG, run.info.run_id)


def download_run_model(tracker: Tracker, run_id: str, destination: Path) -> tuple[Path, str]:
    """The model.pt of run `run_id` (of the run it reused, if linked) and the id of the run holding it."""
    try:
        run = tracker.client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # an unreachable store: the caller's to report
            raise
        raise BnewError(f"run {run_id}: not in the MLflow store at {tracker.uri} (and not a file)") from None
    holder = model_run_id(run)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tracker.client.download_artifacts(holder, MODEL_FILE, str(destination))), holder
    except (MlflowException, OSError):
        raise BnewError(f"run {run_id}: run {holder} has no {MODEL_FILE} (not a finished trial?)") from None


def sweep_export_targets(tracker: Tracker, sweep: str, best: bool) -> list[ExportTarget]:
    """Every finished quantise trial of the sweep (`best`: the most accurate of each cell), one
    per model (trials sharing a trained run are one), in name order."""
    experiment_id = tracker.experiment_id(sweep, create=False)
    if experiment_id is None:
        raise BnewError(f"sweep {sweep}: no MLflow experiment of that name at {tracker.uri}")
    runs = [run for run in tracker.trial_runs(experiment_id)
            if run.info.status == "FINISHED" and run.data.tags.get(axis_tag("stage")) == "quantise"]
    if best:
        chosen: dict[tuple[tuple[str, str], ...], Run] = {}
        for run in runs:
            cell = cell_of(run.data.tags)
            if cell not in chosen or accuracy_of(run) > accuracy_of(chosen[cell]):
                chosen[cell] = run
        runs = list(chosen.values())
    targets: dict[str, ExportTarget] = {}
    for run in sorted(runs, key=lambda run: run.info.run_name):
        accuracy = run.data.metrics.get(ACCURACY_METRIC)
        targets.setdefault(model_run_id(run), ExportTarget(run.info.run_name, model_run_id(run), accuracy))
    return list(targets.values())


def accuracy_of(run: Run) -> float:
    return run.data.metrics.get(ACCURACY_METRIC, float("-inf"))


def log_export(tracker: Tracker, run_id: str, folder: Path, manifest: dict[str, Any],
               check: dict[str, float] | None = None) -> None:
    """The exported files to the run under `export/`; their sizes (`export_model_bin_bytes`,
    `export_binary_weight_bytes`...) and the check's numbers, if it ran, as `export_*` metrics."""
    tracker.client.log_artifacts(run_id, str(folder), EXPORT_FOLDER)
    values = {
        **{size_metric(name): file["bytes"] for name, file in manifest["files"].items()},
        BINARY_WEIGHTS_METRIC: manifest["binary_weights"]["bytes"],
        **{f"export_{key}": value for key, value in (check or {}).items()},
    }
    timestamp = int(time.time() * 1000)
    tracker.client.log_batch(run_id, metrics=[Metric(key, float(value), timestamp, 0) for key, value in values.items()])
