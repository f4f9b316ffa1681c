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
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException
from pyarrow.fs import FileSelector
from ray import tune

from bnew_core.callbacks import Callback, Metrics, TrialResult
from bnew_core.checkpoint import CorruptCheckpointError, checksum_path, verify_checksum
from bnew_core.config import BnewError, TrialConfig
from bnew_core.train import train
from sweeps.core.plan import Stage
from sweeps.core.schema import DEVICE_TAGS, RESUMED_FROM_TAG
from sweeps.records import lineage, trial_log
from sweeps.records.leases import Holder, Lease, LeaseGuard, LeaseLost
from sweeps.records.tracker import Tracker
from sweeps.run.events import STAGE_ERROR, STAGE_FAILED, WAITING_KEY

FAULT_ENV = "BNEW_SWEEP_FAULT"
"""Test hook: `PATTERN@EPOCH[:exit|:final|:hold]` makes the first attempt of every trial whose run
name matches the glob PATTERN raise (with `:exit`, kill its process; with `:final`, raise a
`BnewError`, which no retry can fix; with `:hold`, only wait for `FAULT_GATE_ENV`, then train on)
after reporting EPOCH;
`PATTERN@recorded` kills its process once its run is recorded, before Tune hears that it ended
(as when the driver stops just then)."""
NODE_TAG = "bnew.node"
"""On a trial run: the machine and Ray node it trained on."""
WAITING_FOR_TAG = "bnew.waiting_for_run"
"""On a trial run that waited for another sweep to train its stage: that sweep's run."""
METRICS_ENV = "BNEW_SWEEP_METRICS"
"""Test hook: a JSON file mapping run-name globs to `{metric: value}`. A trial whose run name
matches trains as usual, but its callbacks (MLflow, Tune) and its recorded final metrics see
those values over the trainer's, so a test decides the numbers its report judges, the same on
every CPU. (Epochs a restored checkpoint's metrics.jsonl resends to MLflow keep the trained ones.)"""
UNFENCED_ENV = "BNEW_SWEEP_UNFENCED"
"""Test hook (`python -m bench.chaos --known-bad`): set on a trial's node, a holder that lost its
stage's lease trains on and records its run as the stage's result anyway, as before fencing, so
the chaos soak's checker is shown to catch the duplicate."""
FAULT_GATE_ENV = "BNEW_SWEEP_FAULT_GATE"
"""Test hook: with `FAULT_ENV`, the fault waits at its epoch until this file exists."""
CONTINUED_FROM_TAG = "bnew.continued_from_run"
"""On a trial run that took its stage over from a run whose driver or node died: that run."""
CHECKPOINT_CORRUPT_TAG = "bnew.checkpoint_corrupt"
"""On a trial run: the damaged checkpoints a restore skipped, with why."""

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
        tags = {DEVICE_TAGS[key]: value for key, value in config.device_choice.record().items()}
        if start_epoch > 0:
            tags[RESUMED_FROM_TAG] = str(start_epoch)
        self.tracker.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
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
            gate = Path(os.environ.get(FAULT_GATE_ENV, "/"))
            while not gate.exists():  # the test says when
                time.sleep(0.5)
            if self.fault_how == "hold":
                return
            if self.fault_how == "exit":
                os._exit(1)
            if self.fault_how == "final":
                raise BnewError(f"{FAULT_ENV}: injected failure for good after epoch {epoch}")
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


def forced_metrics(run_name: str) -> Metrics:
    """The values `METRICS_ENV` sets for this run name (every matching glob's, later ones win)."""
    path = os.environ.get(METRICS_ENV)
    if not path:
        return {}
    by_pattern: dict[str, dict[str, float]] = json.loads(Path(path).read_text())
    return {metric: float(value) for pattern, values in by_pattern.items() if fnmatch.fnmatch(run_name, pattern)
            for metric, value in values.items()}


class ForcedMetrics(Callback):
    """`inner`, seeing `values` over every epoch's metrics and the final result's."""

    def __init__(self, inner: Callback, values: Metrics):
        self.inner, self.values = inner, values

    def on_train_start(self, config: Any, start_epoch: int, batches_per_epoch: int) -> None:
        self.inner.on_train_start(config, start_epoch, batches_per_epoch)

    def on_batch_end(self, epoch: int, batch: int, batches_per_epoch: int) -> None:
        self.inner.on_batch_end(epoch, batch, batches_per_epoch)

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        self.inner.on_epoch_end(epoch, {**metrics, **self.values}, checkpoint)

    def on_train_end(self, result: TrialResult) -> None:
        self.inner.on_train_end(with_values(result, self.values))


def with_values(result: TrialResult, values: Metrics) -> TrialResult:
    """A copy of `result` whose final metrics and history carry `values`."""
    return replace(result, final_metrics={**result.final_metrics, **values},
                   history=[{**row, **values} for row in result.history])


def train_forcing_metrics(config: TrialConfig, callbacks: Sequence[Callback], resume_from: Path | None,
                          values: Metrics) -> TrialResult:
    """`train`; with `values` (`METRICS_ENV`), the callbacks and the result see them over the trainer's."""
    if not values:
        return train(config, callbacks, resume_from=resume_from)
    result = train(config, [ForcedMetrics(callback, values) for callback in callbacks], resume_from=resume_from)
    return with_values(result, values)


def execute_stage(
    stage: Stage,
    context: SweepContext,
    work_dir: Path,
    resume_from: Path | None = None,
    callbacks: Sequence[Callback] = (),
    tags: dict[str, str] | None = None,
    on_wait: Callable[[str], None] = print,
) -> None:
    """Train one stage and record it: hold its lease (waiting while another sweep trains it, and
    then only linking that run), fetch input models from MLflow, train, log the run (with `tags`)
    and `work_dir/trial.log` (where the caller captures the stage's output). `on_wait` hears
    which sweep this trial waits for."""
    tracker = Tracker(context.tracking_uri)
    role = stage.roles[0]
    run_id = tracker.open_trial_run(context.experiment_id, context.parent_run_id, context.sweep, stage, role,
                                    {NODE_TAG: node_name()})
    log_path = work_dir / trial_log.LOG_NAME
    lease = Lease(tracker, stage.key, context.sweep, run_id)
    try:
        def waiting(holder: Holder) -> None:
            tracker.client.set_tag(run_id, WAITING_FOR_TAG, holder.run_id)
            on_wait(f"waits for sweep {holder.sweep}, which trains {stage.name}'s stage {stage.key} (run {holder.run_id})")

        held = lease.hold(waiting)
        if held.finished is not None:  # trained by another sweep meanwhile: this run makes way for the links
            tracker.client.delete_run(run_id)
            tracker.link_missing_roles(context.experiment_id, context.parent_run_id, context.sweep, stage)
            return
        run_tags = dict(tags or {})
        if held.previous is not None and resume_from is None:
            resume_from = continued_checkpoint(tracker, held.previous, work_dir / "continued")
            run_tags[CONTINUED_FROM_TAG] = held.previous
        input_paths = {
            field_name: tracker.download_model(key, work_dir / "inputs" / field_name)
            for field_name, key in stage.inputs.items()
        }
        input_runs = {field_name: tracker.finished_stages([key])[key].info.run_id for field_name, key in stage.inputs.items()}
        lineage.record_trial(tracker.client, run_id, stage, role, context.source_tags, input_runs, run_tags)
        config = stage.trial_config(work_dir / "output", input_paths)
        logger = MlflowEpochLogger(tracker, run_id)
        fenced = not os.environ.get(UNFENCED_ENV)
        try:
            result = train_forcing_metrics(config, [logger, CheckpointUploader(tracker, run_id),
                                                    *([LeaseGuard(lease)] if fenced else []), *callbacks],
                                           resume_from, forced_metrics(stage.name))
        except LeaseLost as lost:
            print(lost, flush=True)
            result = None
        logger.close()
        # MLflow unreachable still: raises, and Tune retries the trial.
        taker = taken_over_by(lease, waiting) if fenced else None
        if taker is not None:
            tracker.supersede_trial(run_id, taker)
            tracker.link_missing_roles(context.experiment_id, context.parent_run_id, context.sweep, stage)
            return
        if result is None:  # no renewal for the timeout, and nobody took the stage: the retry goes on with it
            raise LeaseLost(f"stopped training stage {stage.key} while its lease was not renewed")
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
                tracker.fail_trial(run_id, f"{type(exc).__name__}: {exc}", killed=stopped,
                                   final=isinstance(exc, BnewError))
        raise
    finally:
        with contextlib.suppress(Exception):  # MLflow down: the lease then times out
            lease.release()
    if len(stage.roles) > 1:
        tracker.link_missing_roles(context.experiment_id, context.parent_run_id, context.sweep, stage)


def taken_over_by(lease: Lease, waiting: Callable[[Holder], None]) -> Run | None:
    """Fencing, right before a run becomes its stage's result: None while this trial still holds
    the stage's lease. Else another trial took the stage over (this one was paused or cut off past
    the timeout): wait for it as any waiter does, and return its finished run; if it died too, this
    trial holds the stage again (None)."""
    while not lease.still_held():
        held = lease.hold(waiting)
        if held.finished is not None:
            return held.finished
    return None


class CheckpointUploader(Callback):
    """Each checkpoint the trainer writes, also to the trial's MLflow run (`checkpoint/`): if this
    trial's driver or node dies, the sweep that takes its stage over continues from it."""

    def __init__(self, tracker: Tracker, run_id: str):
        self.tracker, self.run_id = tracker, run_id

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        try:
            for path in (checkpoint, checksum_path(checkpoint)):
                self.tracker.client.log_artifact(self.run_id, str(path), "checkpoint")
        except Exception as exc:  # MLflow down: training goes on; only a takeover would start earlier
            print(f"warning: checkpoint of epoch {epoch} not sent to MLflow ({type(exc).__name__})", flush=True)


def continued_checkpoint(tracker: Tracker, run_id: str, destination: Path) -> Path | None:
    """The last checkpoint a run that held this stage sent to MLflow (None: it sent none, or a
    damaged one), to continue its training from."""
    try:
        folder = Path(tracker.client.download_artifacts(run_id, "checkpoint", str(destination)))
        verify_checksum(folder / "checkpoint.pt", "checkpoint", required=True)
    except (MlflowException, OSError, CorruptCheckpointError):
        return None
    return folder / "checkpoint.pt"


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
    hide_unreserved_gpus()
    quiet_sigterm_in_finalisers()
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
                execute_stage(stage, context, Path(work_dir), resume_from, [reporter], tags,
                              on_wait=print if hold_last_report else report_waiting)
        except BnewError as exc:  # recorded FAILED by execute_stage; a retry would fail the same way
            tune.report({STAGE_FAILED: True, STAGE_ERROR: str(exc)})
            return
        if reporter.fault_how == "recorded":
            os._exit(1)
        if reporter.held is not None:
            tune.report(reporter.held)


def report_waiting(text: str) -> None:
    """The trial's wait for another sweep, in its log and to the console (a Tune result of its own;
    not for a search's trials, whose every result a scheduler reads)."""
    print(text, flush=True)
    tune.report({WAITING_KEY: text})


def hide_unreserved_gpus() -> None:
    """A trial that reserved no GPU sees none. Ray 2.60 leaves CUDA_VISIBLE_DEVICES as the node
    has it for a 0-GPU task (ray-project/ray#54868), so on a GPU node `device: auto` would train on
    GPU 0 beside the trials that reserved it, and `device: cuda` would not fail. Done here, in the
    trial, rather than with RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1 in a runtime env or by rewriting
    the stages' `device`: it holds for every trial (the stage graph's and the searches') however
    the driver started (`--local`, `--address`, a Ray job, whose runtime env a driver's own would
    have to merge with), follows what Ray reserved rather than what the spec says, and `auto`
    then records why it trains on the CPU (`bnew.device_fallback`) while `cuda` fails at once.
    CUDA reads the variable once, when it initialises: this runs first in the trial, and an actor
    Tune reuses keeps the same reservation for every trial it runs."""
    if not ray.get_gpu_ids():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def quiet_sigterm_in_finalisers() -> None:
    """Ray's worker turns SIGTERM into SystemExit wherever Python is. When Tune stops the trial's
    actor as it finishes, that can land in a finaliser (a weakref callback, a `__del__`), where
    Python cannot raise: it prints "Exception ignored in ..." and a traceback, which `--verbose`
    streams to the console of a healthy sweep. Such a SystemExit is dropped silently (Python drops
    it either way); any other unraisable exception is still printed."""

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            sys.__unraisablehook__(unraisable)

    sys.unraisablehook = hook


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
