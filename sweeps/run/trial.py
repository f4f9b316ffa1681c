"""One stage, in whatever process runs it: a Tune trial on a Ray worker, or `--debug` in the
driver. It fetches its input models from MLflow, trains, reports every epoch to Tune (with the
trainer's checkpoint on the epochs it writes one, so a retry or `bnew sweep resume` continues
from it), and records itself in MLflow."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import socket
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import ray
from pyarrow.fs import FileSelector
from ray import tune

from bnew_core.callbacks import Callback, Metrics
from bnew_core.checkpoint import CorruptCheckpointError, checksum_path, verify_checksum
from bnew_core.config import BnewError
from bnew_core.train import train
from sweeps.core.plan import Stage
from sweeps.records import lineage, trial_log
from sweeps.records.tracker import Tracker

FAULT_ENV = "BNEW_SWEEP_FAULT"
"""Test hook: `PATTERN@EPOCH[:exit]` makes the first attempt of every trial whose run name
matches the glob PATTERN raise (or, with `:exit`, kill its process) after reporting EPOCH;
`PATTERN@recorded` kills its process once its run is recorded, before Tune hears that it ended
(as when the driver stops just then)."""
NODE_TAG = "bnew.node"
"""On a trial run: the machine and Ray node it trained on."""
RESUMED_FROM_TAG = "bnew.resumed_from_epoch"
"""On a trial run continued from a checkpoint: the epoch it continued from."""
CHECKPOINT_CORRUPT_TAG = "bnew.checkpoint_corrupt"
"""On a trial run: the damaged checkpoints a restore skipped, with why."""
STAGE_FAILED = "bnew_failed"
"""Key of the last Tune result of a trial that failed for a reason a retry cannot fix (a
`BnewError`: bad input, divergence): the trial ends without Tune retrying it."""


@dataclass(frozen=True)
class SweepContext:
    """What a trial needs to record itself (JSON-able: it travels in the Tune trial config)."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    source_tags: dict[str, str] = field(default_factory=dict)
    """MLflow source tags of the driver (its git commit, command, user) for every trial run."""


class MlflowEpochLogger(Callback):
    """Per-epoch metrics to the trial's MLflow run (step = epoch), each epoch once, none lost.

    If the MLflow server cannot be reached, training goes on: the epochs not logged are kept and
    sent with the next epoch's; if some are still missing when training ends, the trial fails
    (`close`) and its retry sends them, from the metrics.jsonl its checkpoint restores. A
    retry also retrains the epochs after Tune's last registered checkpoint; their values are
    the same (resume is exact) and those already logged are not sent again."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id
        self.pending: list[Metrics] = []
        self.logged_epochs: set[int] = set()

    def on_train_start(self, config: Any, start_epoch: int, batches_per_epoch: int) -> None:
        if start_epoch > 0:
            self.tracker.client.set_tag(self.run_id, RESUMED_FROM_TAG, str(start_epoch))
        self.logged_epochs = self.tracker.logged_epochs(self.run_id)
        history = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
        self.pending = [row for row in map(json.loads, history) if int(row["epoch"]) not in self.logged_epochs]
        self.flush()

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        if epoch not in self.logged_epochs:
            self.pending.append(metrics)
        self.flush()

    def close(self) -> None:
        """Send what is still pending; raises while MLflow is down (the trial's retry sends it)."""
        while self.pending:
            self.tracker.log_epoch(self.run_id, self.pending[0])
            self.logged_epochs.add(int(self.pending.pop(0)["epoch"]))

    def flush(self) -> None:
        try:
            self.close()
        except Exception as exc:  # any failure to reach MLflow: keep training, keep the metrics
            epochs = ", ".join(str(int(row["epoch"])) for row in self.pending)
            print(f"warning: MLflow did not take the metrics of epoch(s) {epochs} ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}); kept, sent again after the next epoch", flush=True)


class TuneReporter(Callback):
    """Per-epoch metrics and the resumable checkpoint to Tune (and the fault-injection hook)."""

    def __init__(self, run_name: str, first_attempt: bool, held_epoch: int | None = None):
        self.fault_epoch, self.fault_how = parse_fault(run_name) if first_attempt else (None, "")
        self.held_epoch = held_epoch
        """An epoch whose metrics wait in `held` for the caller to report (after the run is recorded)."""
        self.held: Metrics | None = None

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        if epoch == self.held_epoch:
            self.held = dict(metrics)
        elif checkpoint is None:
            tune.report(dict(metrics))
        else:
            # Tune persists the directory's contents during report; the copy can go afterwards.
            with tempfile.TemporaryDirectory(dir=checkpoint.parent) as directory:
                shutil.copy2(checkpoint, Path(directory) / "checkpoint.pt")
                shutil.copy2(checksum_path(checkpoint), Path(directory) / checksum_path(checkpoint).name)
                tune.report(dict(metrics), checkpoint=tune.Checkpoint.from_directory(directory))
        if epoch == self.fault_epoch:
            if self.fault_how == "exit":
                os._exit(1)
            raise RuntimeError(f"{FAULT_ENV}: injected failure after epoch {epoch}")


def parse_fault(run_name: str) -> tuple[int | None, str]:
    """When this trial should fail, from `FAULT_ENV`: (epoch, "" to raise or "exit"), or
    (None, "recorded")."""
    setting = os.environ.get(FAULT_ENV, "")
    pattern, _, when = setting.rpartition("@")
    if not setting or not fnmatch.fnmatch(run_name, pattern):
        return None, ""
    if when == "recorded":
        return None, when
    epoch, _, how = when.partition(":")
    return int(epoch), how


def execute_stage(
    stage: Stage,
    context: SweepContext,
    work_dir: Path,
    resume_from: Path | None = None,
    callbacks: Sequence[Callback] = (),
    tags: dict[str, str] | None = None,
) -> None:
    """Train one stage and record it: fetch input models from MLflow, train, log the run (with `tags`)
    and `work_dir/trial.log` (where the caller captures the stage's output)."""
    tracker = Tracker(context.tracking_uri)
    role = stage.roles[0]
    run_id = tracker.open_trial_run(context.experiment_id, context.parent_run_id, context.sweep, stage, role)
    tracker.client.set_tag(run_id, NODE_TAG, node_name())
    log_path = work_dir / trial_log.LOG_NAME
    try:
        for tag, value in (tags or {}).items():
            tracker.client.set_tag(run_id, tag, value)
        input_paths = {
            field_name: tracker.download_model(key, work_dir / "inputs" / field_name)
            for field_name, key in stage.inputs.items()
        }
        input_runs = {field_name: tracker.finished_stages([key])[key].info.run_id for field_name, key in stage.inputs.items()}
        lineage.record_trial(tracker.client, run_id, stage, role, context.source_tags, input_runs)
        config = stage.trial_config(work_dir / "output", input_paths)
        logger = MlflowEpochLogger(tracker, run_id)
        result = train(config, [logger, *callbacks], resume_from=resume_from)
        logger.close()
        lineage.log_final_model(tracker.client, context.experiment_id, run_id, result.model_path,
                                int(result.final_metrics["epoch"]), stage.phase)
        trial_log.upload(tracker.client, run_id, log_path, failed=False)
        tracker.finish_trial(run_id, result.output_dir, result.final_metrics)
    except BaseException as exc:
        trial_log.append(log_path, traceback.format_exc())  # the log's last lines: the failure's story
        with contextlib.suppress(Exception):  # MLflow may be the thing that is down
            trial_log.upload(tracker.client, run_id, log_path, failed=True)
        with contextlib.suppress(Exception):
            # Not an Exception: KeyboardInterrupt or SystemExit, the trial was stopped from outside.
            stopped = not isinstance(exc, Exception)
            # Why is the driver's to say ("interrupted (SIGINT)"), and it may have said so already:
            # Ray tears a stopped trial's actor down after Tune's fit() has returned.
            if not stopped or tracker.client.get_run(run_id).info.status == "RUNNING":
                tracker.fail_trial(run_id, f"{type(exc).__name__}: {exc}", killed=stopped)
        raise
    if len(stage.roles) > 1:
        tracker.link_missing_roles(context.experiment_id, context.parent_run_id, context.sweep, stage)


def node_name() -> str:
    """The machine this trial runs on, and its Ray node (a host may hold several nodes)."""
    name = socket.gethostname()
    if ray.is_initialized():  # not in --debug runs
        name += f"/{ray.get_runtime_context().get_node_id()[:12]}"
    return name


def tune_trial(config: dict[str, Any], hold_last_report: bool = False) -> None:
    """The Tune function trainable: one stage, resumed from Tune's checkpoint on a retry.

    `hold_last_report`: the last epoch goes to Tune only once the run is recorded, so that a
    scheduler deciding on it (ASHA's top rung) cannot stop the trial while it records itself."""
    stage, context = Stage.from_dict(config["stage"]), SweepContext(**config["sweep"])
    # Not Tune's trial dir: on the driver's node that folder is synced to the storage while the
    # trainer renames its files in it. What must outlive the attempt goes to Tune's checkpoint
    # and to MLflow.
    with tempfile.TemporaryDirectory(prefix="bnew-trial-") as work_dir:
        resume_from, corrupt = None, []
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            recorded = [run for run in Tracker(context.tracking_uri).own_runs(context.experiment_id, stage, stage.roles[0])
                        if run.info.status == "FINISHED"]
            if recorded:  # it recorded itself, but the driver stopped before Tune saw it end: not trained again
                tune.report(dict(recorded[0].data.metrics))
                return
            resume_from, corrupt = restore_checkpoint(checkpoint, Path(work_dir) / "restored")
        tags = {CHECKPOINT_CORRUPT_TAG: "; ".join(corrupt)[:4000]} if corrupt else {}
        reporter = TuneReporter(stage.name, first_attempt=checkpoint is None,
                                held_epoch=stage.epochs - 1 if hold_last_report else None)
        try:
            with trial_log.capture_output(Path(work_dir) / trial_log.LOG_NAME, tee=False):
                execute_stage(stage, context, Path(work_dir), resume_from, [reporter], tags)
        except BnewError as exc:  # recorded FAILED by execute_stage; a retry would fail the same way
            tune.report({STAGE_FAILED: True, "bnew_error": str(exc)})
            return
        if reporter.fault_how == "recorded":
            os._exit(1)
        if reporter.held is not None:
            tune.report(reporter.held)


def restore_checkpoint(checkpoint: Any, destination: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of the trial that matches its checksum, copied under `destination`
    (None: start afresh), and why each newer one was skipped.

    Tune restores the latest checkpoint it registered; `CheckpointConfig(num_to_keep=2)` keeps the
    one before it in the same folder of the trial's storage (which may also hold a newer one the
    experiment state did not register before the driver died: its epochs need not be redone)."""
    trial_storage = checkpoint.path.rstrip("/").rpartition("/")[0]
    kept = sorted(
        (info.path for info in checkpoint.filesystem.get_file_info(FileSelector(trial_storage))
         if info.base_name.startswith("checkpoint_")),
        reverse=True,
    )
    corrupt = []
    for path in kept:
        directory = tune.Checkpoint(path, checkpoint.filesystem).to_directory(str(destination / path.rpartition("/")[2]))
        try:
            verify_checksum(Path(directory) / "checkpoint.pt", "checkpoint", required=True)
            return Path(directory) / "checkpoint.pt", corrupt
        except CorruptCheckpointError as exc:
            corrupt.append(str(exc))
    return None, corrupt
