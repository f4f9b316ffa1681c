"""The `bnew` command line: `bnew train` runs one trial; `bnew sweep ...` plans, runs and
reports whole grids. Ray and MLflow are imported inside the sweep commands only, so
`bnew train` works without them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from bnew_core.callbacks import Callback, Metrics
from bnew_core.config import BnewError, load_trial_config
from sweeps.report import report_command
from sweeps.submission import register_submission_commands

app = typer.Typer(
    help="Train binary neural networks (BNEW, STE, BMD, BOP) one trial at a time or as Ray sweeps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options() -> None:
    """Train binary neural networks (BNEW, STE, BMD, BOP) one trial at a time or as Ray sweeps."""
    # MLflow draws a progress bar for each input model and spec it downloads: lines of bars on
    # the console (and in --debug runs) that say nothing about the sweep. Ray workers started
    # from here (--local) inherit the setting.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def fail(message: str) -> None:
    """Exit non-zero with a one-line reason on stderr."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """`--set optimiser.lambda_rate=0.05` pairs, values parsed as YAML scalars."""
    import yaml

    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--set {item!r}: expected KEY=VALUE, e.g. optimiser.lambda_rate=0.05")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides


class ProgressCallback(Callback):
    """A rich progress bar over all batches of the trial, with the last epoch's accuracies."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False)
        self.task = None

    def on_train_start(self, config: Any, start_epoch: int, batches_per_epoch: int) -> None:
        self.progress.start()
        total = config.epochs * batches_per_epoch
        self.task = self.progress.add_task(f"{config.phase} {config.binary_optimiser}", total=total,
                                           completed=start_epoch * batches_per_epoch, status="")

    def on_batch_end(self, epoch: int, batch: int, batches_per_epoch: int) -> None:
        self.progress.advance(self.task)

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        self.progress.update(self.task, status=(
            f"epoch {epoch + 1} loss {metrics['loss']:.3f} float {metrics['test_acc_float']:.1f}% "
            f"binary {metrics['test_acc_binary']:.1f}% {metrics['images_per_second']:.0f} img/s"))

    def on_train_end(self, result: Any) -> None:
        self.progress.stop()


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="Trial config YAML (fields of TrialConfig). Omit for the digits demo."),
    phase: Optional[str] = typer.Option(None, help="teacher | pretrain | quantise | real"),
    optimiser: Optional[str] = typer.Option(None, help="ste | bmd | bop | bnew (quantise phase)"),
    dataset: Optional[str] = typer.Option(None, help="digits | synthetic | cifar10 | cifar100 | imagefolder"),
    data_root: Optional[Path] = typer.Option(None, help="Dataset directory (data.root)."),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="Let torchvision download CIFAR."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of this phase."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    lr: Optional[float] = typer.Option(None, help="Initial learning rate."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation, shuffling and augmentation."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    output_dir: Optional[Path] = typer.Option(None, help="Where checkpoints, metrics and the final model go."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher checkpoint; turns distillation on."),
    init: Optional[Path] = typer.Option(None, help="Checkpoint to start from (the pretrained model)."),
    max_batches: Optional[int] = typer.Option(None, help="Debug cap on batches per epoch."),
    resume: Optional[Path] = typer.Option(None, help="Resume from this checkpoint.pt."),
    set_: list[str] = typer.Option([], "--set", help="Any field as dotted KEY=VALUE, e.g. model.scale=false."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Run one trial and print the final binary test accuracy.

    Every TrialConfig field can be given in CONFIG.yaml, by a flag for the common ones, or
    with --set KEY=VALUE; flags override the file. Without CONFIG, the defaults train on
    scikit-learn's digits (no download).
    """
    from bnew_core.train import train as run_trial

    flags = {
        "phase": phase,
        "optimiser.name": optimiser,
        "data.name": dataset,
        "data.root": str(data_root) if data_root else None,
        "data.download": download,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": device,
        "output_dir": str(output_dir) if output_dir else None,
        "teacher_checkpoint": str(teacher) if teacher else None,
        "distillation": True if teacher else None,
        "init_checkpoint": str(init) if init else None,
        "max_batches": max_batches,
    }
    overrides = {key: value for key, value in flags.items() if value is not None}
    overrides.update(parse_set_option(set_))
    try:
        trial_config = load_trial_config(config, overrides)
        callbacks = [] if quiet else [ProgressCallback()]
        result = run_trial(trial_config, callbacks=callbacks, resume_from=resume)
    except BnewError as exc:
        fail(str(exc))
    final = result.final_metrics
    typer.echo(
        f"final binary test accuracy: {final['test_acc_binary']:.2f}% "
        f"({trial_config.phase}, {trial_config.binary_optimiser}, {int(final['epoch']) + 1} epochs) "
        f"-> {result.model_path}"
    )



sweep_app = typer.Typer(
    help="Plan, run and follow sweeps: a YAML spec (or a preset) crossed into trials on Ray Tune, recorded in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(sweep_app, name="sweep")
sweep_app.command("report")(report_command)
register_submission_commands(sweep_app)

SPEC_HELP = "Sweep spec YAML, or a preset name (see `bnew sweep list`)."
MAX_EPOCHS_HELP = "Cap every stage's epochs (a dry run: capped stages get their own keys)."
MAX_BATCHES_HELP = "Cap batches per epoch (a dry run, like --max-epochs)."
YES_HELP = "Run a sweep of more than 1,000 trials."
VERBOSE_HELP = "Tune's own progress tables and the workers' output on this console (default: the compact view)."
ADDRESS_HELP = "Ray cluster to run on (ray://HOST:10001 or HOST:6379). Default: RAY_ADDRESS, a running local Ray, or a new one."


def load_sweep_plan(spec_arg: str, max_epochs: Optional[int], max_batches: Optional[int],
                    on_this_machine: bool = True, yes: bool = True):
    """Spec and plan, or exit 2 naming the bad key (before Ray or MLflow start); see `check_sweep`
    for `on_this_machine` (False: the driver runs on a cluster) and `yes`."""
    from sweeps.plan import build_plan, check_sweep
    from sweeps.spec import load_spec

    for option, value in (("--max-epochs", max_epochs), ("--max-batches", max_batches)):
        if value is not None and value <= 0:
            fail(f"{option}: must be positive, got {value}")
    try:
        spec = load_spec(spec_arg)
        sweep_plan = build_plan(spec, spec_arg, max_epochs, max_batches)
        check_sweep(sweep_plan, on_this_machine, yes)
        return spec, sweep_plan
    except BnewError as exc:
        fail(str(exc))


def print_plan(plan, reused: set[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    from sweeps.tuning import planned_counts, search_size

    search = search_size(plan)  # its cells' templates are not trained as they are: counted in its own row
    stages = {key: stage for key, stage in plan.stages.items() if key not in search.templates}
    table = Table(title=f"sweep {plan.spec.name} (grid {plan.spec.grid_label})")
    for column in ("stage", "runs", "reused", "to train", "epochs to train"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for phase in ("teacher", "pretrain", "quantise", "real"):
        keys = {key for key, stage in stages.items() if stage.phase == phase}
        if keys:
            todo = keys - reused
            table.add_row(phase, str(len(keys)), str(len(keys) - len(todo)), str(len(todo)), str(plan.epochs(todo)))
    if search.cells:
        table.add_row(f"search ({search.cells} cells)", str(search.trials), "-", str(search.trials), f"<= {search.epochs}")
    todo = set(stages) - reused
    table.add_row("all", str(len(stages) + search.trials), str(len(stages) - len(todo)), str(len(todo) + search.trials),
                  str(plan.epochs(todo) + search.epochs), style="bold")
    console = Console()
    console.print(table)
    size = planned_counts(plan)
    console.print(f"{size.trials} trials, {size.runs - size.trials} prerequisites; "
                  f"{size.epochs} trial-epochs in all, {plan.epochs(todo) + search.epochs} still to train")
    if search.cells:
        stopping = f"; {plan.spec.scheduler.name} stops weak trials early (so 'at most')" if plan.spec.scheduler else ""
        console.print(f"search: {plan.spec.search.samples} Optuna suggestions per cell, each trained on every seed "
                      f"of the cell (the mean is the objective){stopping}")


@sweep_app.command("list")
def list_presets() -> None:
    """Show the presets shipped with the package (run them by name)."""
    from rich.console import Console
    from rich.table import Table

    from sweeps.plan import build_plan
    from sweeps.spec import load_spec, preset_names

    from sweeps.tuning import planned_counts

    table = Table(title="sweep presets")
    for column in ("name", "grid", "trials", "stages", "trial-epochs", "description"):
        table.add_column(column)
    for name in preset_names():
        spec = load_spec(name)
        size = planned_counts(build_plan(spec, name))
        table.add_row(name, spec.grid_label, str(size.trials), str(size.runs), str(size.epochs), spec.description)
    Console().print(table)


@sweep_app.command()
def plan(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    max_epochs: Optional[int] = typer.Option(None, help=MAX_EPOCHS_HELP),
    max_batches: Optional[int] = typer.Option(None, help=MAX_BATCHES_HELP),
    lookup: bool = typer.Option(True, "--lookup/--no-lookup", help="Look up finished stages in MLflow."),
) -> None:
    """Expand SPEC into stages (teachers, pretrained models, quantise and real runs); count what MLflow has."""
    sweep_spec, sweep_plan = load_sweep_plan(spec, max_epochs, max_batches)
    reused: set[str] = set()
    from sweeps.tracking import Tracker, store_exists

    if lookup and store_exists(sweep_spec.resolved_tracking_uri()):
        from mlflow.exceptions import MlflowException

        try:
            reused = set(Tracker(sweep_spec.resolved_tracking_uri()).finished_stages(list(sweep_plan.stages)))
        except MlflowException as exc:
            fail(f"tracking_uri: {sweep_spec.resolved_tracking_uri()} is not reachable ({str(exc).splitlines()[0][:160]})")
    print_plan(sweep_plan, reused)


def report_outcome(outcome, plan, spec_arg: str) -> None:
    from sweeps.tuning import searches_line

    typer.echo(
        f"sweep {plan.spec.name}: {len(outcome.trained)} stages trained, {len(outcome.reused)} reused, "
        f"{len(outcome.failed)} failed or interrupted, {len(outcome.not_run)} not run"
        + (f"; {searches_line(outcome.searches)}" if outcome.searches else "")
    )
    for key in sorted(outcome.failed, key=lambda key: plan.stages[key].name):
        typer.echo(f"failed: {plan.stages[key].name} (stage {key})", err=True)
    from sweeps.lineage import ui_hint

    browse = ui_hint(plan.spec.resolved_tracking_uri(), plan.spec.name)
    typer.echo(f"results: bnew sweep report {plan.spec.name}; bnew sweep status {plan.spec.name}; MLflow UI: {browse}")
    if outcome.interrupted:
        typer.echo(f"interrupted by {outcome.interrupted}: unfinished trials are marked KILLED", err=True)
    if outcome.failed or outcome.not_run:
        typer.echo(f"`bnew sweep resume {spec_arg}` (same options) continues from the checkpoints", err=True)
        raise typer.Exit(code=INTERRUPTED_EXIT if outcome.interrupted else 1)


def shutdown_ray() -> None:
    """Disconnect from (or stop the local) Ray, if this command used it."""
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()


INTERRUPTED_EXIT = 130
"""Exit status of a sweep stopped by a signal (as a shell reports Ctrl-C)."""


def execute_and_report(execute, plan, spec_arg: str) -> None:
    """Run `execute()` (a sweep run or resume), always release Ray, then print the outcome."""
    from mlflow.exceptions import MlflowException

    try:
        outcome = execute()
    except BnewError as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C: the sweep's runs are already marked KILLED
        typer.echo(f"interrupted: `bnew sweep resume {spec_arg}` (same options) continues the sweep", err=True)
        raise typer.Exit(code=INTERRUPTED_EXIT)
    except MlflowException as exc:  # a dead tracking server: finished trials stay in Tune's storage
        fail(f"tracking_uri: {plan.spec.resolved_tracking_uri()} failed ({str(exc).splitlines()[0][:160]}); "
             f"`bnew sweep resume` continues once it is back")
    finally:
        shutdown_ray()
    report_outcome(outcome, plan, spec_arg)


@sweep_app.command()
def run(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    local: bool = typer.Option(False, "--local", help="Start a Ray instance on this machine."),
    debug: bool = typer.Option(False, "--debug", help="No Ray: stages one by one in this process (breakpoints work)."),
    max_epochs: Optional[int] = typer.Option(None, help=MAX_EPOCHS_HELP),
    max_batches: Optional[int] = typer.Option(None, help=MAX_BATCHES_HELP),
    yes: bool = typer.Option(False, "--yes", help=YES_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Train every stage of SPEC that MLflow has not finished yet, on Ray Tune, and record it."""
    if sum((address is not None, local, debug)) > 1:
        fail("--address, --local and --debug exclude each other")
    sweep_spec, sweep_plan = load_sweep_plan(spec, max_epochs, max_batches, yes=yes)
    if debug and sweep_spec.tuned_params():
        fail("search.algorithm: optuna searches with Ray Tune, which --debug leaves out; run it with --local "
             "(or debug one trial with `search.algorithm: grid`)")
    from sweeps.execute import run_sweep

    execute_and_report(lambda: run_sweep(sweep_spec, sweep_plan, typer.echo, address=address, local=local, debug=debug,
                                             verbose=verbose),
                       sweep_plan, spec)


@sweep_app.command()
def resume(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    local: bool = typer.Option(False, "--local", help="Start a Ray instance on this machine."),
    max_epochs: Optional[int] = typer.Option(None, help="The --max-epochs the interrupted run used."),
    max_batches: Optional[int] = typer.Option(None, help="The --max-batches the interrupted run used."),
    yes: bool = typer.Option(False, "--yes", help=YES_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
) -> None:
    """Continue an interrupted sweep: unfinished and failed trials resume from their checkpoints.

    Finished trials are not run again; stages that never started are trained."""
    if address is not None and local:
        fail("--address and --local exclude each other")
    sweep_spec, sweep_plan = load_sweep_plan(spec, max_epochs, max_batches, yes=yes)
    from sweeps.execute import resume_sweep

    execute_and_report(lambda: resume_sweep(sweep_spec, sweep_plan, typer.echo, address=address, local=local,
                                                verbose=verbose),
                       sweep_plan, spec)


@sweep_app.command()
def status(
    name: str = typer.Argument(..., help="Sweep name (the MLflow experiment), or a spec/preset to take the name and store from."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow store. Default: the spec's, or the local store."),
    top: int = typer.Option(10, help="How many of the best trials to show."),
    watch: bool = typer.Option(False, "--watch", help="Refresh the live view of running trials from MLflow until the sweep ends."),
    interval: float = typer.Option(5.0, help="Seconds between refreshes with --watch."),
) -> None:
    """Per-stage counts (pending, running, done, failed), failed trials' last log lines and the best
    results so far, from MLflow (from any machine that reaches its server)."""
    import textwrap

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from sweeps.console import watch_sweep
    from sweeps.spec import SweepSpec, load_spec, preset_names
    from sweeps.status import STATES, sweep_status

    if interval <= 0:
        fail(f"--interval: must be positive, got {interval:g}")
    try:
        spec = load_spec(name) if Path(name).is_file() or name in preset_names() else SweepSpec(name=name)
        uri = tracking_uri or spec.resolved_tracking_uri()
        if watch:
            watch_sweep(spec.name, uri, interval)
        result = sweep_status(spec.name, uri, top)
    except BnewError as exc:
        fail(str(exc))
    console = Console()
    counts = Table(title=f"sweep {spec.name}")
    counts.add_column("stage")
    for state in STATES:
        counts.add_column(state, justify="right")
    for phase, by_state in result.counts.items():
        counts.add_row(phase, *(str(by_state[state]) for state in STATES))
    console.print(counts)
    best = Table(title="best trials so far (binary test accuracy %)")
    for column in ("trial", "status", "epoch", "test_acc_binary"):
        best.add_column(column)
    for score in result.best:
        best.add_row(score.name, score.status, str(score.epoch), f"{score.test_acc_binary:.2f}")
    console.print(best)
    if result.unfinished:
        unfinished = Table(title="failed and interrupted trials (`bnew sweep resume` retries them)")
        for column in ("trial", "state", "reason"):
            unfinished.add_column(column)
        for trial in result.unfinished:
            unfinished.add_row(trial.name, trial.state, trial.error)
        console.print(unfinished)
    for trial in result.unfinished:
        if trial.log_tail:
            console.print(f"last lines of {trial.name}'s log (logs/trial.log):", highlight=False)
            console.print(Text(textwrap.indent(trial.log_tail, "  | ")), style="dim")


def main() -> None:  # pragma: no cover - console entry for `python -m sweeps.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
