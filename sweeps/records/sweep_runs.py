"""A sweep as its reports read it from MLflow: the parent run with the spec stored on it, and
one row per trial run (metrics, status and every `bnew.*` tag as columns), plus the per-epoch
histories and the artifact upload the report needs. Needs MLflow and pandas; not Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Run

from bnew_core.config import BnewError
from sweeps.core.schema import AXES, ERROR_TAG, ROLE_TAG, STAGE_KEY_TAG, TAG_PREFIX
from sweeps.records.model_exports import model_run_id
from sweeps.records.tracker import Tracker

TRIAL_COLUMNS = ("grid", "stage", STAGE_KEY_TAG.removeprefix(TAG_PREFIX), *AXES)
"""`bnew.<name>` tags every trial frame has as columns (named without the prefix); any other
`bnew.*` tag, such as `bnew.param.lr` of a params axis, becomes a column too."""


class SweepNotFound(BnewError):
    """No experiment of that name in the store."""


@dataclass
class SweepRuns:
    """Everything MLflow holds about one sweep."""

    tracker: Tracker
    name: str
    parent_run_id: str | None
    spec: dict[str, Any]
    """The spec stored on the parent run; {} when it has none."""
    trials: pd.DataFrame
    """One row per trial run, any status: run_id, run_name, status, start_time and end_time (ms;
    end 0 while it runs), metrics (latest value per key), model_run_id (the run holding its model
    and export), error and every other `bnew.*` tag (at least TRIAL_COLUMNS)."""
    parent_tags: dict[str, str] = field(default_factory=dict)
    """The parent run's tags (the rounds of seeds, the estimate, the caps)."""

    def history(self, run_id: str, metric: str) -> list[tuple[int, float]]:
        """(epoch, value) of one metric of one run."""
        return [(point.step, point.value) for point in self.tracker.client.get_metric_history(run_id, metric)]

    def log_files(self, paths: list[Path], folder: str) -> None:
        """Attach files to the sweep's parent run under `folder`."""
        if self.parent_run_id:
            for path in paths:
                self.tracker.client.log_artifact(self.parent_run_id, str(path), artifact_path=folder)


def load_sweep(tracking_uri: str, sweep: str) -> SweepRuns:
    """Read the sweep's experiment: the parent run, its spec and every trial run."""
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.experiment_id(sweep, create=False)
    if experiment_id is None:
        raise SweepNotFound(f"no MLflow experiment named {sweep!r} at {tracking_uri}")
    parent = tracker.sweep_run(experiment_id)
    spec = (tracker.sweep_spec(parent.info.run_id) if parent else None) or {}
    runs = tracker.search_all([experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    return SweepRuns(tracker, sweep, parent.info.run_id if parent else None, spec, trial_frame(runs),
                     dict(parent.data.tags) if parent else {})


def trial_frame(runs: list[Run]) -> pd.DataFrame:
    """`SweepRuns.trials` of trial runs: one row per run."""
    records = [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time or 0,
            "end_time": run.info.end_time or 0,
            "metrics": dict(run.data.metrics),
            "model_run_id": model_run_id(run),
            **{tag.removeprefix(TAG_PREFIX): value for tag, value in run.data.tags.items() if tag.startswith(TAG_PREFIX)},
        }
        for run in runs
        if run.data.tags.get(ROLE_TAG) == "trial"
    ]
    columns = dict.fromkeys(["run_id", "run_name", "status", "start_time", "end_time", "metrics", "model_run_id",
                             ERROR_TAG.removeprefix(TAG_PREFIX), *TRIAL_COLUMNS])
    columns.update(dict.fromkeys(key for record in records for key in record))
    trials = pd.DataFrame(records, columns=list(columns))
    tag_columns = [column for column in columns if column not in ("start_time", "end_time", "metrics")]
    trials[tag_columns] = trials[tag_columns].astype(object).fillna("")
    return trials
