"""Tuning the final stages: per cell of the grid (optimiser, ablation, dataset, budget,
distillation), Ray Tune's `OptunaSearch` suggests the `axes.params` search spaces and its
`ASHAScheduler` or `MedianStoppingRule` stops weak trials early (`search`, `scheduler` in the spec).

The sweep's own Tuner cannot host this: its search algorithm is `StageScheduler`, which releases
the stage graph, and one Tuner has one searcher and one scheduler, while each cell needs its own
search (its own study) and the scheduler must never stop a teacher or a pretrain. So the stage
graph's Tuner first trains the prerequisites as before, then each cell gets a Tuner of its own
(one Tune experiment per cell under `<storage>/<sweep>/tuning/`, restored with its searcher
state when it exists, so an interrupted search continues and never reruns a finished trial).
The seeds are repeats: Tune's `Repeater` trains each suggestion on every seed of the cell and
tells Optuna the mean, so one lucky run does not pick the params. A trial is a stage like any
other (content key, MLflow run, checkpoints, retries); one a scheduler stopped ends KILLED with
the tag `bnew.stopped_early`, and is never reused."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import optuna
import pandas as pd
import ray
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Repeater
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.repeater import TRIAL_INDEX

from sweeps.analysis.plots import plot_search
from sweeps.analysis.searches import CellSearch, search_history, summarise
from sweeps.core.addresses import is_local
from sweeps.core.plan import Stage
from sweeps.core.schema import CELL_TAG, STOPPED_EARLY_TAG
from sweeps.core.search import TunedCell, cell_params, tuned_stage
from sweeps.core.spec import SweepSpec
from sweeps.records.sweep_runs import trial_frame
from sweeps.records.tracker import Tracker
from sweeps.run.events import STAGE_FAILED, say
from sweeps.run.trial import tune_trial
from sweeps.run.tune_config import REUSE_ACTORS, TUNING_FOLDER, trainable, tune_run_config, tune_storage

Log = Callable[[str], None]


def trial_stage(config: dict[str, Any]) -> Stage:
    """The stage a tuning trial trains, from its Tune config: the suggested params on the seed of
    the `Repeater`'s index."""
    return tuned_stage(Stage.from_dict(config["templates"][config[TRIAL_INDEX]]), config["params"], config["cell"])


def tuning_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable of a search: the suggested stage, run as any other stage."""
    tune_trial({"stage": trial_stage(config).to_dict(), "sweep": config["sweep"]}, hold_last_report=True)


def epochs_run(result: dict[str, Any] | None) -> int:
    return int((result or {}).get("epoch", -1)) + 1


class StoppedEarly(Callback):
    """Marks the MLflow run of a trial the scheduler stopped before its budget: KILLED, with the tag
    `bnew.stopped_early`, and prints one line (stateless: Tune pickles its callbacks)."""

    def __init__(self, tracking_uri: str, experiment_id: str, scheduler: str):
        self.tracking_uri, self.experiment_id, self.scheduler = tracking_uri, experiment_id, scheduler

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        stage, done = trial_stage(trial.config), epochs_run(trial.last_result)
        value = (trial.last_result or {}).get(trial.config["metric"])
        if (trial.last_result or {}).get(STAGE_FAILED):
            return
        if done < stage.epochs:
            mark_stopped(Tracker(self.tracking_uri), self.experiment_id, stage, done, self.scheduler)
        what = "done  " if done >= stage.epochs else f"stopped by {self.scheduler} after {done} of {stage.epochs} epochs:"
        shown = "-" if value is None else f"{value:.2f}"
        say(f"{what} {stage.name}  {trial.config['metric']} {shown}", print)


def mark_stopped(tracker: Tracker, experiment_id: str, stage: Stage, done: int, scheduler: str) -> None:
    for run in tracker.runs_of_stage(stage.key, [experiment_id]):
        if run.info.status != "FINISHED":
            tracker.client.set_tag(run.info.run_id, STOPPED_EARLY_TAG, f"{scheduler}: after {done} of {stage.epochs} epochs")
            tracker.fail_trial(run.info.run_id, f"stopped early by {scheduler} after {done} of {stage.epochs} epochs",
                               killed=True)


def grace_epochs(spec: SweepSpec, template: Stage) -> int:
    """Epochs a cell's trials train before the scheduler may stop them: the spec's `grace_epochs`,
    or by default up to the first frozen epoch of an optimiser that ends with a freeze (BNEW, BMD),
    because their binary accuracy before the freeze says little about the end (README, "Tuning")."""
    if spec.scheduler.grace_epochs is not None:
        return min(spec.scheduler.grace_epochs, template.epochs)
    freeze = (template.config.get("optimiser") or {}).get("freeze_epochs") or 0
    return template.epochs - freeze + 1 if freeze else 1


def trial_scheduler(spec: SweepSpec, template: Stage) -> Any:
    """Tune's own scheduler for the spec's `scheduler`, one per seed (None: every trial runs its budget)."""
    settings, search = spec.scheduler, spec.search
    if settings is None:
        return None
    if settings.name == "asha":
        return PerSeed(lambda: ASHAScheduler(
            time_attr="training_iteration", metric=search.metric, mode=search.mode, max_t=template.epochs,
            grace_period=grace_epochs(spec, template), reduction_factor=settings.reduction_factor, stop_last_trials=False))
    # Never yield to waiting trials (min_time_slice): a paused trial restarts from its last
    # checkpoint, retraining epochs (and, after its last epoch, recording itself a second time).
    return PerSeed(lambda: MedianStoppingRule(time_attr="training_iteration", metric=search.metric, mode=search.mode,
                                              grace_period=grace_epochs(spec, template), min_time_slice=float("inf")))


class PerSeed(FIFOScheduler):
    """Tune's scheduler (`ASHAScheduler`, `MedianStoppingRule`) once per seed: each ranks only the
    trials of its seed (the `Repeater`'s index). The seed moves accuracy more than the tuned params
    do (its own pretrained model and init: on digits, seed 1 read 5-10 points above seeds 0 and 2
    for almost every lambda_rate), so one scheduler over all seeds stopped whole seeds instead of
    weak params. Trials start first come, first served, as under each of them (neither pauses)."""

    def __init__(self, make: Callable[[], TrialScheduler]):
        super().__init__()
        self.make = make
        self.schedulers: dict[int, TrialScheduler] = {}

    def of(self, trial: Any) -> TrialScheduler:
        index = trial.config[TRIAL_INDEX]
        if index not in self.schedulers:
            self.schedulers[index] = self.make()
        return self.schedulers[index]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"seed #{index}: {scheduler.debug_string()}" for index, scheduler in sorted(self.schedulers.items()))


def cell_tuner(spec: SweepSpec, cell: TunedCell, context: Any, verbose: bool) -> Any:
    """The cell's Tuner: restored with its searcher's state if its experiment exists, else new.
    Optuna suggests, `Repeater` trains each suggestion once per seed and tells Optuna the mean;
    Tune's docs advise against early stopping under a `Repeater` because a stopped repeat lowers
    its suggestion's mean, which here only makes a suggestion that a scheduler judged weak look weak."""
    trainable_fn = trainable(spec, tuning_trial)
    path = f"{tune_storage(spec)}/{TUNING_FOLDER}/{cell.experiment_name}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable_fn, resume_unfinished=True, resume_errored=True)
    search = spec.search
    template = cell.templates[0]
    optuna = OptunaSearch(metric=search.metric, mode=search.mode, sampler=tpe_sampler(search.samples, spec.axes.values("seed")[0]))
    searcher = Repeater(optuna, repeat=len(cell.templates), set_index=True)
    max_concurrent = spec.max_concurrent or max(1, int(available_cpus() // spec.resources.cpu))
    run_config = tune_run_config(spec, cell.experiment_name, verbose)
    run_config.storage_path = f"{tune_storage(spec)}/{TUNING_FOLDER}"
    run_config.callbacks = [StoppedEarly(context.tracking_uri, context.experiment_id,
                                         spec.scheduler.name if spec.scheduler else "")]
    return tune.Tuner(
        trainable_fn,
        param_space={
            "templates": [seed.to_dict() for seed in cell.templates], "sweep": asdict(context), "cell": cell.label,
            "metric": search.metric,
            "params": {key: spec.tuned_params()[key].domain() for key in cell_params(spec, template)},
        },
        tune_config=tune.TuneConfig(
            metric=search.metric, mode=search.mode, num_samples=search.samples * len(cell.templates),
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent), reuse_actors=REUSE_ACTORS,
            scheduler=trial_scheduler(spec, template),
            trial_name_creator=lambda trial: trial_stage(trial.config).name,
            trial_dirname_creator=lambda trial: f"{cell.experiment_name[:40]}_{trial.trial_id}",
        ),
        run_config=run_config,
    )


def tpe_sampler(samples: int, seed: int) -> Any:
    """Optuna's TPE sampler, guided after a third of the samples (2 to 10) drawn at random: its
    default of 10 random draws first would leave searches of 6 or 12 samples random search."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not its INFO line per study on the console
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, samples // 3)))


def available_cpus() -> float:
    return ray.cluster_resources().get("CPU", 1.0)


def run_cells(spec: SweepSpec, cells: list[TunedCell], tracker: Tracker, context: Any, interruption: Any,
              log: Log, verbose: bool) -> list[CellSearch]:
    """Search every cell (one after the other) and record each search's history on the parent
    run. Returns the searches that ended."""
    searches: list[CellSearch] = []
    for cell in cells:
        interruption.fit(cell_tuner(spec, cell, context, verbose))
        runs = tracker.search_all([context.experiment_id], f"tags.`{CELL_TAG}` = '{cell.label}'")
        if interruption.signal_name is not None:  # Tune saved the search; its running trials are stopped
            tracker.kill_running_trials(context.experiment_id, {run.info.run_id: [run] for run in runs
                                                                if STOPPED_EARLY_TAG not in run.data.tags},
                                        f"interrupted ({interruption.signal_name}); `bnew sweep resume` continues it")
            return searches
        # A stopped trial's actor, torn down after the callback marked its run, leaves the mark
        # alone (`execute_stage` records a stop only on a run still RUNNING).
        trials = trial_frame(runs)
        record_search(tracker, context.parent_run_id, trials, cell, spec)
        (summary,) = summarise(trials, spec)
        searches.append(summary)
        say(f"search {cell.label}: {summary.trials} trials ({summary.samples} params x {summary.seeds} seeds), "
            f"{summary.stopped} stopped early, {summary.failed} failed; "
            + ("no params finished their budget on every seed" if summary.best_val is None else
               f"best {summary.shown_params()} (mean of {summary.seeds} seeds: {spec.search.metric} {summary.best_val:.2f}, "
               f"test_acc_binary {summary.best_test:.2f})"), log)
    return searches


def record_search(tracker: Tracker, parent_run_id: str, trials: pd.DataFrame, cell: TunedCell, spec: SweepSpec) -> None:
    """The search's history on the sweep's parent run: every trial's params, metric, epochs run and
    state (`tuning/<cell>/trials.csv`), the Optuna study's own `trials_dataframe` where Tune saved
    the searcher's state on this machine, and one PNG per tuned param of the metric against it."""
    frame = search_history(trials, cell, spec)
    folder = f"tuning/{cell.label.replace('/', '_')}"
    tracker.client.log_text(parent_run_id, frame.to_csv(index=False), f"{folder}/trials.csv")
    study = optuna_study_frame(spec, cell)
    if study is not None:
        tracker.client.log_text(parent_run_id, study.to_csv(index=False), f"{folder}/optuna_study.csv")
    with tempfile.TemporaryDirectory() as directory:
        for key in cell_params(spec, cell.templates[0]):
            path = Path(directory) / f"{key}.png"
            path.write_bytes(plot_search(frame, key, spec.search.metric, cell.label,
                                         log_scale=spec.tuned_params()[key].loguniform is not None))
            tracker.client.log_artifact(parent_run_id, str(path), folder)


def optuna_study_frame(spec: SweepSpec, cell: TunedCell) -> pd.DataFrame | None:
    """Optuna's `trials_dataframe` of the cell's study, from the searcher state Tune saved in the
    experiment folder (a local storage only)."""
    storage = tune_storage(spec)
    folder = Path(f"{storage}/{TUNING_FOLDER}/{cell.experiment_name}")
    if not is_local(storage) or not list(folder.glob("searcher-state-*.pkl")):
        return None
    searcher = OptunaSearch()  # Tune saves the innermost searcher apart from its wrappers
    searcher.restore_from_dir(str(folder))
    return searcher._ot_study.trials_dataframe()  # the study Tune's OptunaSearch keeps
