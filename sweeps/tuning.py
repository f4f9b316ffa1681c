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

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pandas as pd
from ray.tune import Callback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search.repeater import TRIAL_INDEX

from bnew_core.config import build_trial_config
from sweeps.plan import FINAL_PHASES, RUN_SPECIFIC_FIELDS, Plan, Role, Stage, deep_merge, param_applies, stage_key
from sweeps.spec import SweepSpec
from sweeps.tracking import STOPPED_EARLY_TAG, Tracker

CELL_TAG = "bnew.cell"
"""On every trial of a tuned cell (its search trials and its repeats): the cell's label."""
TUNING_FOLDER = "tuning"
"""Beside the sweep's Tune experiments: one experiment per tuned cell (never taken for the sweep's)."""

Log = Callable[[str], None]


@dataclass
class TunedCell:
    """A point of the grid without its seed and its tuned params: one search."""

    label: str
    """Its final stages' run name without the seed (`demo/bnew/baseline/budget4`)."""
    templates: list[Stage]
    """The plan's final stage per seed (tuned params at their settings' value), first seed first:
    the repeats of each suggestion."""

    @property
    def experiment_name(self) -> str:
        return f"{self.label.replace('/', '_')}-{self.templates[0].key[:8]}"


def tuned_cells(plan: Plan) -> list[TunedCell]:
    """The plan's final stages that a search tunes, by cell."""
    tuned = plan.spec.tuned_params()
    cells: dict[str, TunedCell] = {}
    for stage in plan.stages.values():
        optimiser = stage.roles[0].tags["bnew.optimiser"]
        if stage.phase in FINAL_PHASES and any(param_applies(key, optimiser) for key in tuned):
            label = stage.name.rpartition("/seed")[0]
            cells.setdefault(label, TunedCell(label, [])).templates.append(stage)
    return list(cells.values())


@dataclass
class SearchSize:
    """What the plan's searches train, as counts: Optuna picks the params only while the sweep runs."""

    cells: int
    trials: int
    """Search trials: `search.samples` suggestions per cell, each trained on every seed of the cell."""
    epochs: int
    """At most: every trial trains its full budget unless the scheduler stops it."""
    templates: set[str]
    """The plan's stage keys that stand for the searched stages (never trained as they are)."""


def search_size(plan: Plan) -> SearchSize:
    cells = tuned_cells(plan)
    runs = [(plan.spec.search.samples * len(cell.templates), cell.templates[0].epochs) for cell in cells]
    return SearchSize(len(cells), sum(trials for trials, _ in runs), sum(trials * epochs for trials, epochs in runs),
                      {template.key for cell in cells for template in cell.templates})


class PlannedCounts(NamedTuple):
    trials: int
    runs: int
    """Trials and prerequisites."""
    epochs: int


def planned_counts(plan: Plan) -> PlannedCounts:
    """The sweep's size, each search counted as the trials it runs (not as its cells' templates)."""
    size = search_size(plan)
    return PlannedCounts(len(plan.trial_roles()) - len(size.templates) + size.trials,
                         len(plan.stages) - len(size.templates) + size.trials,
                         plan.epochs(set(plan.stages) - size.templates) + size.epochs)


def cell_params(spec: SweepSpec, template: Stage) -> list[str]:
    optimiser = template.roles[0].tags["bnew.optimiser"]
    return [key for key in spec.tuned_params() if param_applies(key, optimiser)]


def tuned_stage(template: Stage, params: dict[str, Any], label: str) -> Stage:
    """The template's stage with `params` (dotted keys) set: its own content key, run name and tags."""
    layer: dict[str, Any] = {}
    for key, value in params.items():
        section, _, leaf = key.partition(".")
        layer = deep_merge(layer, {section: {leaf: value}} if leaf else {key: value})
    placeholders = {field_name: f"inputs/{field_name}/model.pt" for field_name in template.inputs}
    config = build_trial_config({**deep_merge(template.config, layer), **placeholders}, template.name)
    stored = config.model_dump(mode="json", exclude=set(RUN_SPECIFIC_FIELDS))
    shown = "/".join(f"{key.rpartition('.')[2]}={value:.4g}" if isinstance(value, float) else
                     f"{key.rpartition('.')[2]}={value}" for key, value in params.items())
    tags = {**template.roles[0].tags, CELL_TAG: label, **{f"bnew.param.{key}": str(v) for key, v in params.items()}}
    return Stage(key=stage_key(stored, template.inputs), phase=template.phase, config=stored,
                 inputs=dict(template.inputs), roles=[Role(name=f"{template.name}/{shown}", tags=tags)])


def trial_stage(config: dict[str, Any]) -> Stage:
    """The stage a tuning trial trains, from its Tune config: the suggested params on the seed of
    the `Repeater`'s index."""
    return tuned_stage(Stage.from_dict(config["templates"][config[TRIAL_INDEX]]), config["params"], config["cell"])


def tuning_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable of a search: the suggested stage, run as any other stage."""
    from sweeps.execute import tune_trial

    tune_trial({"stage": trial_stage(config).to_dict(), "sweep": config["sweep"]}, hold_last_report=True)


def epochs_run(result: dict[str, Any] | None) -> int:
    return int((result or {}).get("epoch", -1)) + 1


class StoppedEarly(Callback):
    """Marks the MLflow run of a trial the scheduler stopped before its budget: KILLED, with the tag
    `bnew.stopped_early`, and prints one line (stateless: Tune pickles its callbacks)."""

    def __init__(self, tracking_uri: str, experiment_id: str, scheduler: str):
        self.tracking_uri, self.experiment_id, self.scheduler = tracking_uri, experiment_id, scheduler

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from sweeps.execute import STAGE_FAILED

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
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

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
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter, Repeater
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.execute import REUSE_ACTORS, trainable, tune_run_config, tune_storage

    trainable_fn = trainable(spec, tuning_trial)
    path = f"{tune_storage(spec)}/{TUNING_FOLDER}/{cell.experiment_name}"
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable_fn, resume_unfinished=True, resume_errored=True)
    search = spec.search
    template = cell.templates[0]
    optuna = OptunaSearch(metric=search.metric, mode=search.mode, sampler=tpe_sampler(search.samples, spec.axes.seed[0]))
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
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not its INFO line per study on the console
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, samples // 3)))


def available_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1.0)


def run_cells(spec: SweepSpec, cells: list[TunedCell], tracker: Tracker, context: Any, interruption: Any,
              log: Log, verbose: bool) -> list[CellSearch]:
    """Search every cell (one after the other) and record each search's history on the parent
    run. Returns the searches that ended."""
    from sweeps.report import search_all_runs, trial_frame

    searches: list[CellSearch] = []
    for cell in cells:
        interruption.fit(cell_tuner(spec, cell, context, verbose))
        runs = search_all_runs(tracker.client, context.experiment_id, f"tags.`{CELL_TAG}` = '{cell.label}'")
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


def say(text: str, log: Log) -> None:
    """A line on the live console while it holds stdout, else to `log`."""
    from sweeps.console import ACTIVE

    for console in ACTIVE:
        console.line(text)
    if not ACTIVE:
        log(text)


# --- what the searches left in MLflow ---------------------------------------------------------
@dataclass
class CellSearch:
    """A cell's search, read from MLflow."""

    cell: str
    trials: int
    """Its runs: each suggested set of params once per seed."""
    samples: int
    """Suggested sets of params."""
    seeds: int
    stopped: int
    failed: int
    best_params: dict[str, str]
    """The params with the best mean of `search.metric` among those that finished their budget on every seed."""
    best_val: float | None
    """Their mean `search.metric` over the seeds, and their mean test accuracy."""
    best_test: float | None

    def shown_params(self) -> str:
        """The best params, floats to 4 digits (`trials.csv` on the parent run has them whole)."""
        return ", ".join(f"{key}={shorter(value)}" for key, value in self.best_params.items()) or "-"


def shorter(value: str) -> str:
    try:
        return f"{float(value):.4g}" if "." in value or "e" in value else value
    except ValueError:
        return value


def searches_line(searches: list[CellSearch]) -> str:
    """The searches of a run in a few words, for its closing line."""
    return (f"{sum(s.trials for s in searches)} search trials in {len(searches)} cell{'s' if len(searches) > 1 else ''} "
            f"({sum(s.stopped for s in searches)} stopped early, {sum(s.failed for s in searches)} failed)")


def search_trials(trials: Any, cell: str) -> Any:
    """The rows of the report's trial frame (`sweeps.report.load_sweep`) that are `cell`'s search."""
    column = CELL_TAG.removeprefix("bnew.")
    if column not in trials:
        return trials.iloc[0:0]
    return trials[trials[column] == cell]


def summarise(trials: Any, spec: SweepSpec) -> list[CellSearch]:
    """Per cell: how many trials ran, were stopped and failed, and the params whose runs finished
    their budget on every seed with the best mean of `search.metric`, with that mean and their
    mean test accuracy."""
    column = CELL_TAG.removeprefix("bnew.")
    if column not in trials or spec.search is None:
        return []
    metric, sign = spec.search.metric, 1 if spec.search.mode == "max" else -1
    stopped_column = STOPPED_EARLY_TAG.removeprefix("bnew.")
    summaries = []
    for cell in sorted(set(trials[column]) - {""}):
        search = search_trials(trials, cell)
        params = [key for key in search if key.startswith("param.") and (search[key] != "").any()]
        seeds = search["seed"].nunique()
        means = mean_over_seeds(search, params, metric)
        complete = means[means["seeds"] == seeds]
        best = None if complete.empty else (sign * complete["val"]).idxmax()
        summaries.append(CellSearch(
            cell=cell, trials=len(search), samples=search.groupby(params).ngroups, seeds=seeds,
            stopped=int((search[stopped_column] != "").sum()) if stopped_column in search else 0,
            failed=int((search["status"] == "FAILED").sum()),
            best_params={} if best is None else dict(zip((key.removeprefix("param.") for key in params),
                                                         best if isinstance(best, tuple) else (best,))),
            best_val=None if best is None else float(complete.loc[best, "val"]),
            best_test=None if best is None else float(complete.loc[best, "test"]),
        ))
    return summaries


def mean_over_seeds(search: Any, params: list[str], metric: str) -> Any:
    """Per suggested params (the `params` columns): the mean `metric` and test accuracy of their
    finished runs, and how many seeds finished."""
    finished = search[(search["status"] == "FINISHED") & search["metrics"].map(lambda m: metric in m)]
    return pd.DataFrame({
        "val": finished["metrics"].map(lambda m: m[metric]),
        "test": finished["metrics"].map(lambda m: m.get("test_acc_binary", float("nan"))),
        **{key: finished[key] for key in params},
    }).groupby(params).agg(val=("val", "mean"), test=("test", "mean"), seeds=("val", "size"))


def best_runs_only(trials: Any, spec: SweepSpec) -> Any:
    """The trial frame without the search trials that are not their cell's best (the report's
    tables then hold, per cell, the best params on every seed)."""
    column = CELL_TAG.removeprefix("bnew.")
    if column not in trials or spec.search is None:
        return trials
    keep = trials[column] == ""
    for summary in summarise(trials, spec):
        in_cell = trials[column] == summary.cell
        for key, value in summary.best_params.items():
            in_cell &= trials[f"param.{key}"] == value
        keep |= in_cell
    return trials[keep]


def render_markdown(summaries: list[CellSearch], metric: str) -> str:
    lines = ["## Tuning", "", "Per cell, the params with the best mean over the seeds (all trained to their budget).", "",
             f"| cell | best params | {metric} | test_acc_binary | trials (params x seeds) | stopped early | failed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        val = "-" if s.best_val is None else f"{s.best_val:.2f}"
        test = "-" if s.best_test is None else f"{s.best_test:.2f}"
        lines.append(f"| {s.cell} | {s.shown_params()} | {val} | {test} | {s.samples} x {s.seeds} | {s.stopped} | {s.failed} |")
    return "\n".join(lines) + "\n"


def type_of(spec: SweepSpec, key: str) -> Callable[[str], Any]:
    space = spec.tuned_params()[key]
    if space.randint is not None:
        return int
    if space.choice is not None:
        return lambda text: next(value for value in space.choice if str(value) == text)
    return float


def record_search(tracker: Tracker, parent_run_id: str, trials: Any, cell: TunedCell, spec: SweepSpec) -> None:
    """The search's history on the sweep's parent run: every trial's params, metric, epochs run and
    state (`tuning/<cell>/trials.csv`), the Optuna study's own `trials_dataframe` where Tune saved
    the searcher's state on this machine, and one PNG per tuned param of the metric against it."""
    from sweeps.report import pyplot

    metric = spec.search.metric
    search = search_trials(trials, cell.label)
    stopped_column = STOPPED_EARLY_TAG.removeprefix("bnew.")
    frame = pd.DataFrame({
        "run": search["run_name"], "seed": search["seed"], "status": search["status"],
        "stopped_early": search[stopped_column] != "" if stopped_column in search else False,
        "epochs": search["metrics"].map(lambda m: int(m.get("epoch", -1)) + 1),
        metric: search["metrics"].map(lambda m: m.get(metric)),
        "test_acc_binary": search["metrics"].map(lambda m: m.get("test_acc_binary")),
        **{key: search[f"param.{key}"].map(type_of(spec, key)) for key in cell_params(spec, cell.templates[0])},
    })
    folder = f"tuning/{cell.label.replace('/', '_')}"
    tracker.client.log_text(parent_run_id, frame.to_csv(index=False), f"{folder}/trials.csv")
    study = optuna_study_frame(spec, cell)
    if study is not None:
        tracker.client.log_text(parent_run_id, study.to_csv(index=False), f"{folder}/optuna_study.csv")
    plt = pyplot()
    for key in cell_params(spec, cell.templates[0]):
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for stopped, marker in ((False, "o"), (True, "x")):
            shown = frame[frame["stopped_early"] == stopped]
            axis.scatter(shown[key], shown[metric], marker=marker,
                         label="stopped early (its last epoch)" if stopped else "full budget")
        if spec.tuned_params()[key].loguniform is not None:
            axis.set_xscale("log")
        axis.set(xlabel=key, ylabel=metric)
        axis.set_title(cell.label, fontsize=9)
        axis.legend(fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100)
        plt.close(figure)
        tracker.client.log_image(parent_run_id, _png(buffer), f"{folder}/{key}.png")


def _png(buffer: io.BytesIO) -> Any:
    from PIL import Image

    buffer.seek(0)
    return Image.open(buffer)


def optuna_study_frame(spec: SweepSpec, cell: TunedCell) -> Any:
    """Optuna's `trials_dataframe` of the cell's study, from the searcher state Tune saved in the
    experiment folder (a local storage only)."""
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.execute import tune_storage

    folder = Path(f"{tune_storage(spec)}/{TUNING_FOLDER}/{cell.experiment_name}")
    if "://" in str(folder) or not list(folder.glob("searcher-state-*.pkl")):
        return None
    searcher = OptunaSearch()  # Tune saves the innermost searcher apart from its wrappers
    searcher.restore_from_dir(str(folder))
    return searcher._ot_study.trials_dataframe()  # the study Tune's OptunaSearch keeps
