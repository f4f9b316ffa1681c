"""Run a sweep's stages: on Ray Tune (a local Ray or a cluster), or one by one in this process.

One Tuner runs the whole sweep. Its search algorithm, `StageScheduler`, suggests a stage as a
Tune trial as soon as the stages it takes models from are done, so there is no barrier between
levels and Tune's own concurrency limits, resources and `FailureConfig` retries apply. Each
trial reports every epoch to Tune, with the trainer's checkpoint on the epochs it writes one
(the spec's `checkpoint` interval), so a retry (or `bnew sweep resume`, through `Tuner.restore`)
continues from the last checkpoint, and records itself in MLflow.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import pickle
import shutil
import socket
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ray.tune.search import Searcher

from bnew_core.callbacks import Callback, Metrics
from bnew_core.checkpoint import CorruptCheckpointError, checksum_path, verify_checksum
from bnew_core.config import BnewError
from sweeps.interrupt import Interruption
from sweeps import lineage, trial_log
from sweeps.console import show_console
from sweeps.plan import Plan, Stage, check_data_roots
from sweeps.spec import SweepSpec, dump_spec
from sweeps.storage import check_storage_reaches_every_node, experiment_uris
from sweeps.tracking import Tracker, is_local_uri, is_loopback
from sweeps.tuning import CellSearch, run_cells, tuned_cells

FAULT_ENV = "BNEW_SWEEP_FAULT"
"""Test hook: `PATTERN@EPOCH[:exit]` makes the first attempt of every trial whose run name
matches the glob PATTERN raise (or, with `:exit`, kill its process) after reporting EPOCH;
`PATTERN@recorded` kills its process once its run is recorded, before Tune hears that it ended
(as when the driver stops just then)."""
CHECKPOINT_CORRUPT_TAG = "bnew.checkpoint_corrupt"
"""On a trial run: the damaged checkpoints a restore skipped, with why."""
STAGE_FAILED = "bnew_failed"
"""Key of the last Tune result of a trial that failed for a reason a retry cannot fix (a
`BnewError`: bad input, divergence): the trial ends without Tune retrying it."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class SweepContext:
    """What a trial needs to record itself (JSON-able: it travels in the Tune trial config)."""

    sweep: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    source_tags: dict[str, str] = field(default_factory=dict)
    """MLflow source tags of the driver (its git commit, command, user) for every trial run."""


@dataclass
class SweepOutcome:
    """Stage keys by how the sweep left them."""

    reused: set[str] = field(default_factory=set)
    trained: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    """Started but not finished: failed, or interrupted."""
    not_run: set[str] = field(default_factory=set)
    """Never started: an input failed, or the sweep was interrupted first."""
    interrupted: str | None = None
    """The signal that stopped the sweep (SIGINT, SIGTERM), if one did."""
    searches: list[CellSearch] = field(default_factory=list)
    """Each cell searched to its end by this run."""


# --- one stage, in whatever process runs it ---------------------------------------------------
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
            self.tracker.client.set_tag(self.run_id, "bnew.resumed_from_epoch", str(start_epoch))
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
        from ray import tune

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
    from bnew_core.train import train

    tracker = Tracker(context.tracking_uri)
    role = stage.roles[0]
    run_id = tracker.open_trial_run(context.experiment_id, context.parent_run_id, context.sweep, stage, role)
    tracker.client.set_tag(run_id, "bnew.node", node_name())
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
    import ray

    name = socket.gethostname()
    if ray.is_initialized():  # not in --debug runs
        name += f"/{ray.get_runtime_context().get_node_id()[:12]}"
    return name


def tune_trial(config: dict[str, Any], hold_last_report: bool = False) -> None:
    """The Tune function trainable: one stage, resumed from Tune's checkpoint on a retry.

    `hold_last_report`: the last epoch goes to Tune only once the run is recorded, so that a
    scheduler deciding on it (ASHA's top rung) cannot stop the trial while it records itself."""
    from ray import tune

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
    from pyarrow.fs import FileSelector
    from ray import tune

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


# --- the search algorithm that releases stages as their inputs finish ---------------------------
def critical_path_order(stages: list[Stage]) -> list[str]:
    """Stage keys, the longest chain of epochs from the stage to the end of the sweep first (then
    the deepest): list scheduling on the critical path. A teacher that distilled trials wait for
    starts before independent trials, which fill the free slots later; deepest-first alone left
    the teachers of cifar10-cpu-study to the end, with their dependants after them."""
    dependants: dict[str, list[Stage]] = {stage.key: [] for stage in stages}
    for stage in stages:
        for key in stage.inputs.values():
            if key in dependants:
                dependants[key].append(stage)
    chain: dict[str, int] = {}

    def chain_epochs(stage: Stage) -> int:
        if stage.key not in chain:
            chain[stage.key] = stage.epochs + max(map(chain_epochs, dependants[stage.key]), default=0)
        return chain[stage.key]

    return [stage.key for stage in sorted(stages, key=lambda s: (-chain_epochs(s), -s.depth))]


class StageScheduler(Searcher):
    """Suggests each stage once, as soon as all its input stages are done, on the critical path
    first. Finishes when nothing is running and nothing can start."""

    def __init__(self, stages: list[Stage], done: set[str], context: SweepContext):
        super().__init__()
        self.stages = {stage.key: stage.to_dict() for stage in stages}
        self.order = critical_path_order(stages)
        self.context = asdict(context)
        self.done, self.failed = set(done), set()
        self.trial_stage: dict[str, str] = {}
        """Tune trial id -> stage key."""

    def ready(self) -> list[str]:
        submitted = set(self.trial_stage.values())
        return [
            key for key in self.order
            if key not in submitted and all(i in self.done for i in self.stages[key]["inputs"].values())
        ]

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        ready = self.ready()
        if ready:
            self.trial_stage[trial_id] = ready[0]
            return {"stage": self.stages[ready[0]], "sweep": self.context}
        running = set(self.trial_stage.values()) - self.done - self.failed
        return None if running else self.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.trial_stage[trial_id]
        if error or (result or {}).get(STAGE_FAILED):
            self.failed.add(key)
        else:
            self.done.add(key)
            self.failed.discard(key)  # an errored trial resumed by `bnew sweep resume`

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def trial_name(trial: Any) -> str:
    return trial.config["stage"]["roles"][0]["name"]


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial).replace('/', '_')}_{trial.trial_id}"


# --- the driver ---------------------------------------------------------------------------------
def check_cluster_settings(spec: SweepSpec, address: str | None) -> None:
    """Workers on other machines must log through an MLflow server, not a path of theirs (the
    Tune storage is checked once Ray is connected: `check_storage_reaches_every_node`)."""
    if address is None or is_loopback(address):
        return
    tracking_uri = spec.resolved_tracking_uri()
    if is_local_uri(tracking_uri):
        raise BnewError(
            f"tracking_uri: {tracking_uri} is a local store, but trials on cluster {address} run on other "
            "machines; set tracking_uri to an MLflow server (http://HOST:5000, `mlflow server --serve-artifacts`)"
        )


def start_ray(address: str | None, local: bool, log: Log, verbose: bool = False) -> None:
    """Connect to (or with `local`, start) Ray once per process.

    Workers' output stays in their trial logs unless `verbose` (then it streams here too)."""
    import ray

    if ray.is_initialized():
        return
    skip_deleted_checkpoints()
    if not verbose:  # the console prints each failure's reason; its traceback is in the trial's log
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        # Tune's closing "ERROR ... Trials did not complete" repeats the console's FAILED lines.
        logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    if local:
        # A Ray only this driver uses, on loopback: its token-auth advice is not the user's business.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=verbose)
    else:  # None: RAY_ADDRESS, a running cluster, or a new one
        ray.init(address=address, logging_level="WARNING", log_to_driver=verbose)
    log(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")


def skip_deleted_checkpoints() -> None:
    """Let Tune's checkpoint manager pass over an old checkpoint that is gone already.

    A driver stopped after Tune deleted a trial's oldest checkpoint (`num_to_keep`) and before it
    saved the experiment state leaves that checkpoint listed. After `resume`, Ray 2.60's manager
    deletes it again, `_is_directory` raises FileNotFoundError outside its try, and Tune prints an
    ERROR with a traceback and skips the rest of registering the trial's new checkpoint (seen in
    the S3 killed-driver test)."""
    from pyarrow.fs import FileType
    from ray.train._internal import checkpoint_manager

    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "skips_missing", False):
        return

    def delete_if_there(fs: Any, fs_path: str) -> None:
        if fs.get_file_info(fs_path).type != FileType.NotFound:
            delete(fs=fs, fs_path=fs_path)

    delete_if_there.skips_missing = True  # type: ignore[attr-defined]
    checkpoint_manager._delete_fs_path = delete_if_there


def trainable(spec: SweepSpec, function: Callable[[dict[str, Any]], None] = tune_trial) -> Any:
    from ray import tune

    return tune.with_resources(function, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


REUSE_ACTORS = True
"""A trial's actor trains the next trial too: a new one spends ~6 s importing torch, Ray Train and
MLflow (bench/RESULTS.md), the most of what a short trial costs. Every trial seeds its own generators
and has its own MLflow client, output capture and working folder, so nothing carries over; Tune
starts a new actor when the last trial's thread has not ended."""


def sweep_tuner(spec: SweepSpec, stages: list[Stage], done: set[str], context: SweepContext, verbose: bool = False) -> Any:
    """A Tuner for `stages` (a new Tune experiment under the sweep's storage folder)."""
    from ray import tune

    scheduler = StageScheduler(stages, done, context)
    return tune.Tuner(
        trainable(spec),
        tune_config=tune.TuneConfig(
            search_alg=scheduler,
            num_samples=len(stages),
            max_concurrent_trials=spec.max_concurrent,
            reuse_actors=REUSE_ACTORS,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune_run_config(spec, time.strftime("%Y%m%d-%H%M%S"), verbose),
    )


def tune_storage(spec: SweepSpec) -> str:
    """One folder per sweep; each `bnew sweep run` adds a Tune experiment inside it."""
    return f"{spec.resolved_storage_path().rstrip('/')}/{spec.name}"


def tune_run_config(spec: SweepSpec, name: str, verbose: bool = False) -> Any:
    """`verbose`: Tune's own progress tables; otherwise `sweeps.console` shows the sweep."""
    from ray import tune

    from sweeps.console import TuneEvents

    return tune.RunConfig(
        name=name,
        storage_path=tune_storage(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Tune snapshots its experiment state every TUNE_GLOBAL_CHECKPOINT_S ("auto": at least
        # 10 s apart, about 5% of the driver's time) and forces one when a trial has registered
        # num_to_keep checkpoints since the last: rare at the spec's checkpoint interval.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1 if verbose else 0,
        callbacks=[TuneEvents()],
    )


def run_in_process(stages: list[Stage], context: SweepContext, work_root: Path, log: Log) -> None:
    """`--debug`: every stage in this process, in plan order (inputs first), no Ray."""
    for index, stage in enumerate(stages, 1):
        log(f"[{index}/{len(stages)}] {stage.name} ({stage.phase}, {stage.epochs} epochs)")
        work_dir = work_root / stage.name.replace("/", "_")
        shutil.rmtree(work_dir, ignore_errors=True)  # a debug run starts each stage afresh
        with trial_log.capture_output(work_dir / trial_log.LOG_NAME, tee=True):  # breakpoints keep the terminal
            execute_stage(stage, context, work_dir)


def open_sweep(spec: SweepSpec, plan: Plan, log: Log) -> tuple[Tracker, SweepContext, SweepOutcome]:
    """Experiment, parent run, and which stages MLflow already has (their roles linked here)."""
    tracker = Tracker(spec.resolved_tracking_uri())
    experiment_id = tracker.experiment_id(spec.name)
    parent_run_id = tracker.open_sweep_run(experiment_id, spec.name, dump_spec(spec))
    for tag, value in plan.caps_tags().items():
        tracker.client.set_tag(parent_run_id, tag, value)
    source_tags = lineage.driver_source_tags(lineage.driver_command())
    lineage.record_sweep(tracker.client, experiment_id, parent_run_id, spec.description, source_tags)
    context = SweepContext(spec.name, tracker.uri, experiment_id, parent_run_id, source_tags)
    runs_by_key = tracker.stage_runs(list(plan.stages), tracker.trial_runs(experiment_id))
    finished = tracker.finished_stages(list(plan.stages), runs_by_key)
    for key in finished:
        tracker.link_missing_roles(experiment_id, parent_run_id, spec.name, plan.stages[key], runs_by_key[key])
    outcome = SweepOutcome(reused=set(finished))
    log(f"MLflow: experiment {spec.name!r} at {tracker.uri}, parent run {parent_run_id}")
    return tracker, context, outcome


def run_sweep(
    spec: SweepSpec,
    plan: Plan,
    log: Log,
    address: str | None = None,
    local: bool = False,
    debug: bool = False,
    restore: str | None = None,
    verbose: bool = False,
) -> SweepOutcome:
    """Train every stage of `plan` that MLflow does not have finished yet; with `restore`, first
    continue that Tune experiment (its unfinished and errored trials, from their checkpoints)."""
    check_data_roots(plan)
    if not debug:
        check_cluster_settings(spec, address)
    tracker, context, outcome = open_sweep(spec, plan, log)
    cells = tuned_cells(plan)  # searched after the stage graph's Tuner (sweeps.tuning says why)
    templates = {template.key for cell in cells for template in cell.templates}
    pending = [stage for key, stage in plan.stages.items() if key not in outcome.reused and key not in templates]
    log(f"{len(outcome.reused)} stages reused, {len(pending)} to train ({plan.epochs({s.key for s in pending})} epochs)"
        + (f", then {len(cells)} searches of {spec.search.samples} params x their seeds" if cells else ""))
    interruption = Interruption()
    console = None
    try:
        if pending and debug:
            run_in_process(pending, context, Path(tune_storage(spec)) / "debug", log)
        elif pending or cells:
            from ray import tune

            start_ray(address, local, log, verbose)
            check_storage_reaches_every_node(tune_storage(spec))
            if restore is not None:  # said before the console takes stdout
                log(f"resuming Tune experiment {restore}")
            console = show_console(pending, outcome.reused, verbose)
            done = set(outcome.reused)
            if restore is not None:
                interruption.fit(tune.Tuner.restore(restore, trainable(spec), resume_errored=True))
                done |= set(tracker.finished_stages([stage.key for stage in pending]))
            missing = [stage for stage in pending if stage.key not in done]
            if missing:
                interruption.fit(sweep_tuner(spec, missing, done, context, verbose))
            outcome.searches = run_cells(spec, cells, tracker, context, interruption, log, verbose)
    except (KeyboardInterrupt, SystemExit):  # SystemExit: Ray's SIGTERM handler, outside Tune
        interruption.signal_name = interruption.signal_name or "SIGINT"
        raise
    finally:
        if console is not None:
            console.close()
        outcome.interrupted = interruption.signal_name
        finish(tracker, context, outcome, pending)
    return outcome


def finish(tracker: Tracker, context: SweepContext, outcome: SweepOutcome, pending: list[Stage]) -> None:
    """Sort the pending stages by what MLflow now says and close the parent run.

    Tune has ended every trial by now, so a run still RUNNING belongs to a trial stopped from
    outside (the sweep interrupted, or its process lost for good): it is marked KILLED."""
    runs_by_key = tracker.stage_runs([stage.key for stage in pending], tracker.trial_runs(context.experiment_id))
    reason = (f"interrupted ({outcome.interrupted})" if outcome.interrupted
              else "its process ended without recording the end of the run")
    tracker.kill_running_trials(context.experiment_id, runs_by_key, f"{reason}; `bnew sweep resume` continues it")
    outcome.trained = set(tracker.finished_stages(list(runs_by_key), runs_by_key))
    outcome.failed = {key for key, runs in runs_by_key.items() if runs and key not in outcome.trained}
    outcome.not_run = {key for key, runs in runs_by_key.items() if not runs}
    tracker.finish_sweep_run(context.parent_run_id, len(outcome.failed) + len(outcome.not_run), outcome.interrupted)


def resume_sweep(
    spec: SweepSpec, plan: Plan, log: Log, address: str | None = None, local: bool = False, verbose: bool = False
) -> SweepOutcome:
    """Continue the latest Tune experiment of the sweep (unfinished and errored trials resume from
    their checkpoints), then run whatever stages are still missing."""
    from ray import tune

    storage = tune_storage(spec)
    restorable = [uri for uri in experiment_uris(storage) if tune.Tuner.can_restore(uri)]
    if not restorable:
        log(f"no Tune experiment of {spec.name!r} under {storage} to restore; running the missing stages")
    return run_sweep(spec, plan, log, address=address, local=local, restore=restorable[-1] if restorable else None,
                     verbose=verbose)
