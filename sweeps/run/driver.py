"""The sweep's driver: run a plan's stages on Ray Tune (a local Ray or a cluster), or one by one
in this process (`--debug`), and record the outcome.

One Tuner runs the stage graph: its search algorithm, `StageScheduler`, suggests a stage as a
Tune trial as soon as the stages it takes models from are done (`sweeps.run.stage_graph`). Each
trial reports every epoch to Tune with the trainer's checkpoint on the epochs it writes one, so a
retry (or `bnew sweep resume`, through `Tuner.restore`) continues from the last checkpoint, and
records itself in MLflow (`sweeps.run.trial`). Then each tuned cell gets a search of its own
(`sweeps.run.tuning`)."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import ray
from pyarrow.fs import FileType
from ray import tune
from ray.train._internal import checkpoint_manager

from sweeps.analysis.cost import estimate, estimate_lines, record_estimate
from sweeps.core.addresses import check_tracking_reaches
from sweeps.core.plan import Plan, Stage
from sweeps.core.schema import CAP_TAGS
from sweeps.core.search import searched_templates, tuned_cells
from sweeps.core.spec import SweepSpec, dump_spec
from sweeps.records import lineage, trial_log
from sweeps.records.tracker import Tracker
from sweeps.run.checks import check_before_run
from sweeps.run.events import SINKS, EventSink
from sweeps.run.interrupt import Interruption
from sweeps.run.outcome import SweepOutcome
from sweeps.run.resources import check_trials_fit, packed_slots, trial_resources
from sweeps.run.rounds import run_rounds
from sweeps.run.stage_graph import StageScheduler, trial_dirname, trial_name
from sweeps.run.storage import check_storage_reaches_every_node, experiment_uris, node_machines
from sweeps.run.trial import SweepContext, execute_stage
from sweeps.run.tune_config import REUSE_ACTORS, trainable, tune_run_config, tune_storage
from sweeps.run.tuning import run_cells

Log = Callable[[str], None]
ShowEvents = Callable[[list[Stage], set[str]], EventSink]
"""Opens a view of the stages to train (given those reused) that registers itself in `SINKS`
until its `close()`: the console, injected by the command line."""


def start_ray(address: str | None, local: bool, log: Log, verbose: bool = False) -> None:
    """Connect to (or with `local`, start) Ray once per process.

    Workers' output stays in their trial logs unless `verbose` (then it streams here too)."""
    if ray.is_initialized():
        return
    skip_deleted_checkpoints()
    if not verbose:  # the console prints each failure's reason; its traceback is in the trial's log
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
        # Tune's closing "ERROR ... Trials did not complete" repeats the console's FAILED lines.
        logging.getLogger("ray.tune.tune").setLevel(logging.CRITICAL)
    # fit()'s result grid reads each trial's result.json; a trial that never started (a resume
    # stopped first) or that linked a stage another sweep trained has none, and Tune warns about
    # it. The sweep reads its results from MLflow, never from that grid.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if local:
        # A Ray only this driver uses, on loopback: its token-auth advice is not the user's business.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=verbose)
    else:  # None: RAY_ADDRESS, a running cluster, or a new one
        ray.init(address=address, logging_level="WARNING", log_to_driver=verbose)
    log(f"Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs")


def check_cluster(spec: SweepSpec, wait_for_resources: bool, log: Log) -> None:
    """Before any trial starts, on the connected cluster: one node holds a trial's resources (else
    a `BnewError` naming the field; with `wait_for_resources`, one line while Tune waits for such a
    node), and Tune's storage and the tracking store reach every node."""
    waiting = check_trials_fit(trial_resources(spec), autoscaling=wait_for_resources)
    if waiting:
        # Tune's own warning would repeat every minute that no trial can start; the line says why.
        logging.getLogger("ray.tune.execution.insufficient_resources_manager").setLevel(logging.ERROR)
        log(waiting)
    machines = node_machines()
    check_storage_reaches_every_node(tune_storage(spec), machines)
    for machine in machines:  # the nodes' own addresses: a head node's driver sees RAY_ADDRESS as its own IP
        check_tracking_reaches(spec.resolved_tracking_uri(), machine)


def note_estimate(plan: Plan, pending: list[Stage], tracker: Tracker, context: SweepContext, log: Log,
                  slots: int, slots_from: str) -> None:
    """Say what the pending stages should take, and keep the first estimate for the report."""
    cost = estimate(plan, {stage.key for stage in pending}, slots, slots_from, tracker)
    record_estimate(tracker, context.parent_run_id, cost)
    log(estimate_lines(cost)[0])


def skip_deleted_checkpoints() -> None:
    """Let Tune's checkpoint manager pass over an old checkpoint that is gone already.

    A driver stopped after Tune deleted a trial's oldest checkpoint (`num_to_keep`) and before it
    saved the experiment state leaves that checkpoint listed. After `resume`, Ray 2.60's manager
    deletes it again, `_is_directory` raises FileNotFoundError outside its try, and Tune prints an
    ERROR with a traceback and skips the rest of registering the trial's new checkpoint (seen in
    the S3 killed-driver test)."""
    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "skips_missing", False):
        return

    def delete_if_there(fs: Any, fs_path: str) -> None:
        if fs.get_file_info(fs_path).type != FileType.NotFound:
            delete(fs=fs, fs_path=fs_path)

    delete_if_there.skips_missing = True  # type: ignore[attr-defined]
    checkpoint_manager._delete_fs_path = delete_if_there


def sweep_tuner(spec: SweepSpec, stages: list[Stage], done: set[str], context: SweepContext,
                verbose: bool = False) -> tune.Tuner:
    """A Tuner for `stages` (a new Tune experiment under the sweep's storage folder)."""
    return tune.Tuner(
        trainable(spec),
        tune_config=tune.TuneConfig(
            search_alg=StageScheduler(stages, done, context),
            num_samples=len(stages),
            # Without a limit Tune lets a searcher of its own have one trial pending at a time, so
            # trials started one by one, each after the last one's actor had started (6-13 s): eight
            # quarter-GPU trials never all ran at once. Resources alone limit them now.
            max_concurrent_trials=spec.max_concurrent or len(stages),
            reuse_actors=REUSE_ACTORS,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune_run_config(spec, time.strftime("%Y%m%d-%H%M%S"), verbose),
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
    for key, tag in CAP_TAGS.items():
        tracker.client.set_tag(parent_run_id, tag, str(getattr(plan, key) or ""))
    source_tags = lineage.driver_source_tags(lineage.driver_command())
    lineage.record_sweep(tracker.client, experiment_id, parent_run_id, spec.description, source_tags)
    lineage.record_sweep_datasets(tracker.client, parent_run_id, plan.stages.values())
    context = SweepContext(spec.name, tracker.uri, experiment_id, parent_run_id, source_tags)
    runs_by_key = tracker.stage_runs(list(plan.stages), tracker.trial_runs(experiment_id))
    finished = tracker.finished_stages(list(plan.stages), runs_by_key)
    for key in finished:
        tracker.link_missing_roles(experiment_id, parent_run_id, spec.name, plan.stages[key], runs_by_key[key])
    outcome = SweepOutcome(reused=set(finished), parent_run_id=parent_run_id)
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
    show: ShowEvents | None = None,
    wait_for_resources: bool = False,
) -> SweepOutcome:
    """Train every stage of `plan` that MLflow does not have finished yet; with `restore`, first
    continue that Tune experiment (its unfinished and errored trials, from their checkpoints).
    `show` opens the view of the trials (the console) once Ray runs; `wait_for_resources`: when
    no node of the cluster holds a trial, wait for one to join instead of failing. With seed
    rounds (`axes.seed: {start, step, max}`), `plan` is the first round's and `run_rounds` adds
    the later ones."""
    def run(round_plan: Plan, round_restore: str | None) -> SweepOutcome:
        return run_plan(spec, round_plan, log, address, local, debug, round_restore, verbose, show, wait_for_resources)

    if spec.axes.seed_rounds is None:
        return run(plan, restore)
    return run_rounds(spec, plan, log, run, restore)


def run_plan(spec: SweepSpec, plan: Plan, log: Log, address: str | None, local: bool, debug: bool,
             restore: str | None, verbose: bool, show: ShowEvents | None, wait_for_resources: bool) -> SweepOutcome:
    """`run_sweep` for one plan."""
    check_before_run(plan, "local" if debug or local else address, in_process=debug)
    tracker, context, outcome = open_sweep(spec, plan, log)
    cells = tuned_cells(plan)  # searched after the stage graph's Tuner (sweeps.run.tuning says why)
    templates = searched_templates(plan)
    pending = [stage for key, stage in plan.stages.items() if key not in outcome.reused and key not in templates]
    log(f"{len(outcome.reused)} stages reused, {len(pending)} to train ({plan.epochs({s.key for s in pending})} epochs)"
        + (f", then {len(cells)} searches of {spec.search.samples} params x their seeds" if cells else ""))
    interruption = Interruption()
    view = None
    try:
        if pending and debug:
            note_estimate(plan, pending, tracker, context, log, 1, "--debug: one stage at a time, in this process")
            run_in_process(pending, context, Path(tune_storage(spec)) / "debug", log)
        elif pending or cells:
            start_ray(address, local, log, verbose)
            check_cluster(spec, wait_for_resources, log)
            nodes = [node for node in ray.nodes() if node["Alive"]]
            note_estimate(plan, pending, tracker, context, log, packed_slots(nodes, trial_resources(spec)),
                          f"the Ray cluster: {len(nodes)} node{'s' if len(nodes) > 1 else ''}")
            if restore is not None:  # said before the console takes stdout
                log(f"resuming Tune experiment {restore}")
            view = show(pending, outcome.reused) if show else None
            done = set(outcome.reused)
            if restore is not None:
                outcome.restored = restore
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
        if view is not None:
            view.close()
        outcome.interrupted = interruption.signal_name
        finish(tracker, context, outcome, pending)
    return outcome


def finish(tracker: Tracker, context: SweepContext, outcome: SweepOutcome, pending: list[Stage]) -> None:
    """Sort the pending stages by what MLflow now says and close the parent run.

    Tune has ended every trial by now, so a run still RUNNING belongs to a trial stopped from
    outside (the sweep interrupted, or its process lost for good): it is marked KILLED."""
    runs_by_key = tracker.stage_runs([stage.key for stage in pending], tracker.trial_runs(context.experiment_id))
    outcome.names = {stage.key: stage.name for stage in pending}
    reason = (f"interrupted ({outcome.interrupted})" if outcome.interrupted
              else "its process ended without recording the end of the run")
    tracker.kill_running_trials(context.experiment_id, runs_by_key, f"{reason}; `bnew sweep resume` continues it")
    outcome.trained = set(tracker.finished_stages(list(runs_by_key), runs_by_key))
    # This sweep's own runs say how it left a stage (another sweep's may still run it).
    own = {key: [run for run in runs if run.info.experiment_id == context.experiment_id]
           for key, runs in runs_by_key.items() if key not in outcome.trained}
    unfinished = {key: runs for key, runs in own.items() if runs}
    # What kill_running_trials just marked KILLED, or a stop marked before: stopped from outside.
    outcome.interrupted_stages = {key for key, runs in unfinished.items()
                                  if runs[0].info.status in ("RUNNING", "SCHEDULED", "KILLED")}
    outcome.failed = set(unfinished) - outcome.interrupted_stages
    outcome.not_run = {key for key, runs in own.items() if not runs}
    tracker.finish_sweep_run(context.parent_run_id, len(unfinished) + len(outcome.not_run), outcome.interrupted)


def resume_sweep(spec: SweepSpec, plan: Plan, log: Log, address: str | None = None, local: bool = False,
                 verbose: bool = False, show: ShowEvents | None = None, wait_for_resources: bool = False) -> SweepOutcome:
    """Continue the latest Tune experiment of the sweep (unfinished and errored trials resume from
    their checkpoints), then run whatever stages are still missing."""
    storage = tune_storage(spec)
    restorable = [uri for uri in experiment_uris(storage) if tune.Tuner.can_restore(uri)]
    if not restorable:
        log(f"no Tune experiment of {spec.name!r} under {storage} to restore; running the missing stages")
    return run_sweep(spec, plan, log, address=address, local=local, restore=restorable[-1] if restorable else None,
                     verbose=verbose, show=show, wait_for_resources=wait_for_resources)
