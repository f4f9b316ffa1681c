"""A sweep's trials as one pandas DataFrame (`sweeps.results`), as researchers analyse them: one
row per trial run, like `mlflow.search_runs` but with the sweep's axes as plain columns, each
metric's final value, and the URI its model loads from with `mlflow.pytorch.load_model`."""

from __future__ import annotations

import pandas as pd

from sweeps.analysis.report import default_tracking_uri
from sweeps.analysis.tables import VALIDATION_METRIC, best_val_metric, final_metric
from sweeps.core.schema import AXES
from sweeps.records.lineage import final_model_uris
from sweeps.records.sweep_runs import load_sweep

FIRST_COLUMNS = ("run_id", "run_name", "state", "stage", "grid", *AXES, "stage_key", "reused_from", "model_uri")
"""The columns every `results` frame starts with; `param.*` axes, `final_*` and `best_val_*` metrics follow."""
BEST_METRICS = ("test_acc_binary",)
"""Metrics also given at each run's epoch of best validation accuracy (`best_val_<metric>`): the
one the report reads (each costs a history request per run)."""


def results(name: str, tracking_uri: str | None = None, best: bool = True) -> pd.DataFrame:
    """One row per trial of sweep `name` (any state), in run-name order, from the store at
    `tracking_uri` (default: where `bnew sweep run` tracked it). `best`: also each run's
    `best_val_*` metrics, from its validation history (one MLflow request per run and metric)."""
    sweep = load_sweep(tracking_uri or default_tracking_uri(name), name)
    trials = sweep.trials.sort_values("run_name").reset_index(drop=True)
    client = sweep.tracker.client
    experiments = {client.get_run(run_id).info.experiment_id
                   for run_id in set(trials.model_run_id) - set(trials.run_id)}
    uris = final_model_uris(client, sorted(experiments | {sweep.tracker.experiment_id(name, create=False)}))
    frame = trials.drop(columns=["metrics", "model_run_id", "start_time", "end_time"]).rename(columns={"status": "state"})
    frame["reused_from"] = trials["reused_from"] if "reused_from" in trials else ""
    frame["model_uri"] = [uris.get(run_id, "") for run_id in trials.model_run_id]
    metric_names = sorted({key.removeprefix("final_") for metrics in trials.metrics for key in metrics})
    for metric in metric_names:
        frame[f"final_{metric}"] = [final_metric(metrics, metric) for metrics in trials.metrics]
    if best:
        for metric in (m for m in BEST_METRICS if m in metric_names):
            frame[f"best_val_{metric}"] = [best_val_metric(sweep, run_id, metric) if VALIDATION_METRIC in metrics
                                           else float("nan") for run_id, metrics in zip(trials.run_id, trials.metrics)]
    first = [column for column in FIRST_COLUMNS if column in frame]
    return frame[first + [column for column in frame if column not in first]]
