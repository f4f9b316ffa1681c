"""`bnew sweep ...`: list the presets, plan a spec, run or resume it, follow its status and report
it. Each command imports the layers it uses when it runs: `plan` needs no Ray, `status` and
`report` read MLflow only."""

from __future__ import annotations

import contextlib
import os
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer

from sweeps.cli.common import (
    ADDRESS_HELP,
    INTERRUPTED_EXIT,
    MAX_BATCHES_HELP,
    MAX_EPOCHS_HELP,
    SET_HELP,
    SPEC_HELP,
    VERBOSE_HELP,
    WAIT_HELP,
    YES_HELP,
    check_caps,
    fail,
    load_sweep_plan,
    parse_set_option,
    reaching,
    user_errors,
)

if TYPE_CHECKING:
    from sweeps.analysis.cost import Estimate
    from sweeps.core.plan import Plan
    from sweeps.run.outcome import SweepOutcome

sweep_app = typer.Typer(
    help="Plan, run and follow sweeps: a YAML spec (or a preset) crossed into trials on Ray Tune, recorded in MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@sweep_app.command("list")
def list_presets() -> None:
    """Show the presets shipped with the package (run them by name)."""
    from sweeps.core.plan import build_plan  # lazy: start-up (as every import in a command)
    from sweeps.core.search import planned_counts
    from sweeps.core.spec import load_spec, preset_names
    from sweeps.ui.tables import show_table

    rows = []
    for name in preset_names():
        spec = load_spec(name)
        size = planned_counts(build_plan(spec, name))
        rows.append((name, spec.grid_label, str(size.trials), str(size.runs), str(size.epochs), spec.description))
    show_table("sweep presets", ("name", "grid", "trials", "stages", "trial-epochs", "description"), rows,
               whole=("name", "grid"))


def print_plan(plan: "Plan", reused: set[str]) -> None:
    """The plan's stages per phase and its searches: how many, how many reused, epochs to train."""
    from rich.console import Console
    from rich.table import Table

    from sweeps.core.schema import PHASES
    from sweeps.core.search import planned_counts, search_size, searched_templates

    search, templates = search_size(plan), searched_templates(plan)  # templates: counted in the search's row
    stages = {key: stage for key, stage in plan.stages.items() if key not in templates}
    table = Table(title=f"sweep {plan.spec.name} (grid {plan.spec.grid_label})")
    for column in ("stage", "runs", "reused", "to train", "epochs to train"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for phase in PHASES:
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


@sweep_app.command()
def show(
    preset: str = typer.Argument(..., help="A preset's name (see `bnew sweep list`), or a spec file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Print a preset's YAML, to start a spec from (with --set: the spec it makes, validated)."""
    from sweeps.core.spec import PRESET_DIR, dump_spec, load_spec, preset_names

    if not set_ and preset in preset_names():
        typer.echo((PRESET_DIR / f"{preset}.yaml").read_text(), nl=False)
        return
    with user_errors():
        typer.echo(dump_spec(load_spec(preset, parse_set_option(set_))), nl=False)


@sweep_app.command()
def plan(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    max_epochs: Optional[int] = typer.Option(None, help=MAX_EPOCHS_HELP),
    max_batches: Optional[int] = typer.Option(None, help=MAX_BATCHES_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    lookup: bool = typer.Option(True, "--lookup/--no-lookup", help="Look up finished stages in MLflow (and check its URI)."),
    data_dir: Optional[Path] = typer.Option(None, help="Check dataset roots in this folder (BNEW_DATA_DIR) instead."),
    yes: bool = typer.Option(False, "--yes", help=YES_HELP),
    address: Optional[str] = typer.Option(None, help="Ray cluster (HOST:6379) whose trial slots the wall time is "
                                          "estimated on. Default: RAY_ADDRESS, else this machine's CPUs."),
) -> None:
    """Expand SPEC into stages (teachers, pretrained models, quantise and real runs); count what MLflow has.

    A dataset missing here is listed, not refused: the sweep may run where its data is. Hours per
    phase come from finished stages of the same workload in MLflow, else from the bench's figures."""
    if data_dir is not None:
        os.environ["BNEW_DATA_DIR"] = str(data_dir)  # relative dataset roots are read from it
    from sweeps.core.plan import missing_data
    from sweeps.core.rounds import rounds_summary
    from sweeps.core.spec import load_spec
    from sweeps.run.planned import plan as plan_sweep

    check_caps(max_epochs, max_batches)
    with user_errors():
        sweep_spec = load_spec(spec, parse_set_option(set_))
    with user_errors(), reaching(sweep_spec.resolved_tracking_uri()) if lookup else contextlib.nullcontext():
        planned = plan_sweep(sweep_spec, max_epochs, max_batches, yes, lookup, address)
    print_plan(planned.plan, planned.reused)
    print_cost(planned.estimate)
    if sweep_spec.axes.seed_rounds is not None:
        typer.echo(rounds_summary(planned.plan))
    for line in missing_data(planned.plan):
        typer.echo(f"{line}: not on this machine; checked where the sweep runs (`run` refuses it here)")


def print_cost(cost: "Estimate") -> None:
    """Hours per phase and in all, and the wall time on the trial slots the estimate assumed."""
    from sweeps.analysis.cost import estimate_lines, hours
    from sweeps.ui.tables import show_table

    show_table("estimated hours", ("stage", "to train", "epochs", "hours"),
               [(name, str(phase.stages), str(phase.epochs), hours(phase.seconds)) for name, phase in cost.phases.items()])
    for line in estimate_lines(cost):
        typer.echo(line)


def report_outcome(outcome: "SweepOutcome", plan: "Plan", spec_arg: str) -> None:
    """The sweep's closing lines: what was trained, reused, failed, interrupted; where to look next."""
    from sweeps.analysis.searches import searches_line
    from sweeps.records.links import ui_hint

    unfinished = len(outcome.failed) + len(outcome.interrupted_stages)
    typer.echo(
        f"sweep {plan.spec.name}: {len(outcome.trained)} stages trained, {len(outcome.reused)} reused, "
        f"{len(outcome.failed)} failed, {len(outcome.interrupted_stages)} interrupted, {len(outcome.not_run)} not run"
        + (f"; {searches_line(outcome.searches)}" if outcome.searches else "")
    )
    for word, keys in (("failed", outcome.failed), ("interrupted", outcome.interrupted_stages)):
        for key in sorted(keys, key=lambda key: outcome.names[key]):
            typer.echo(f"{word}: {outcome.names[key]} (stage {key})", err=True)
    browse = ui_hint(plan.spec.resolved_tracking_uri(), plan.spec.name)
    typer.echo(f"results: bnew sweep report {plan.spec.name}; bnew sweep status {plan.spec.name}; MLflow UI: {browse}")
    if outcome.interrupted:
        typer.echo(f"interrupted by {outcome.interrupted}: unfinished trials are marked KILLED", err=True)
    if unfinished or outcome.not_run:
        typer.echo(f"`bnew sweep resume {spec_arg}` (same options) continues from the checkpoints", err=True)
        raise typer.Exit(code=INTERRUPTED_EXIT if outcome.interrupted else 1)


def execute_and_report(execute: Callable[..., "SweepOutcome"], plan: "Plan", spec_arg: str, verbose: bool,
                       **options: Any) -> None:
    """Run `execute` (a sweep run or resume) with the console as its view, always release Ray,
    then print the outcome."""
    import ray
    from mlflow.exceptions import MlflowException

    from sweeps.ui.console import show_console

    try:
        with user_errors():
            outcome = execute(plan.spec, plan, typer.echo, verbose=verbose,
                              show=lambda stages, reused: show_console(stages, reused, verbose), **options)
    except KeyboardInterrupt:  # a second Ctrl-C: the sweep's runs are already marked KILLED
        typer.echo(f"interrupted: `bnew sweep resume {spec_arg}` (same options) continues the sweep", err=True)
        raise typer.Exit(code=INTERRUPTED_EXIT)
    except MlflowException as exc:  # a dead tracking server: finished trials stay in Tune's storage
        fail(f"tracking_uri: {plan.spec.resolved_tracking_uri()} failed ({str(exc).splitlines()[0][:160]}); "
             f"`bnew sweep resume` continues once it is back")
    finally:
        ray.shutdown()  # disconnect from (or stop the local) Ray, if the sweep used it
    report_outcome(outcome, plan, spec_arg)


@sweep_app.command()
def run(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    local: bool = typer.Option(False, "--local", help="Start a Ray instance on this machine."),
    debug: bool = typer.Option(False, "--debug", help="No Ray: stages one by one in this process (breakpoints work)."),
    max_epochs: Optional[int] = typer.Option(None, help=MAX_EPOCHS_HELP),
    max_batches: Optional[int] = typer.Option(None, help=MAX_BATCHES_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    yes: bool = typer.Option(False, "--yes", help=YES_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
    wait_for_resources: bool = typer.Option(False, "--wait-for-resources", help=WAIT_HELP),
) -> None:
    """Train every stage of SPEC that MLflow has not finished yet, on Ray Tune, and record it."""
    if sum((address is not None, local, debug)) > 1:
        fail("--address, --local and --debug exclude each other")
    sweep_spec, sweep_plan = load_sweep_plan(spec, max_epochs, max_batches, set_, yes=yes)
    if debug and sweep_spec.tuned_params():
        fail("search.algorithm: optuna searches with Ray Tune, which --debug leaves out; run it with --local "
             "(or debug one trial with `search.algorithm: grid`)")
    from sweeps.run.driver import run_sweep

    execute_and_report(run_sweep, sweep_plan, spec, verbose, address=address, local=local, debug=debug,
                       wait_for_resources=wait_for_resources)


@sweep_app.command()
def resume(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    local: bool = typer.Option(False, "--local", help="Start a Ray instance on this machine."),
    max_epochs: Optional[int] = typer.Option(None, help="The --max-epochs the interrupted run used."),
    max_batches: Optional[int] = typer.Option(None, help="The --max-batches the interrupted run used."),
    set_: list[str] = typer.Option([], "--set", help="The --set settings the interrupted run used (repeatable)."),
    yes: bool = typer.Option(False, "--yes", help=YES_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
    wait_for_resources: bool = typer.Option(False, "--wait-for-resources", help=WAIT_HELP),
) -> None:
    """Continue an interrupted sweep: unfinished and failed trials resume from their checkpoints.

    Finished trials are not run again; stages that never started are trained."""
    if address is not None and local:
        fail("--address and --local exclude each other")
    _, sweep_plan = load_sweep_plan(spec, max_epochs, max_batches, set_, yes=yes)
    from sweeps.run.driver import resume_sweep

    execute_and_report(resume_sweep, sweep_plan, spec, verbose, address=address, local=local,
                       wait_for_resources=wait_for_resources)


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
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from sweeps.analysis.status import sweep_status
    from sweeps.core.schema import STATES
    from sweeps.core.spec import SweepSpec, load_spec, preset_names
    from sweeps.ui.console import watch_sweep
    from sweeps.ui.tables import show_table

    if interval <= 0:
        fail(f"--interval: must be positive, got {interval:g}")
    with user_errors():
        spec = load_spec(name) if Path(name).is_file() or name in preset_names() else SweepSpec(name=name)
        uri = tracking_uri or spec.resolved_tracking_uri()
    with user_errors(), reaching(uri):
        if watch:
            watch_sweep(spec.name, uri, interval)
        result = sweep_status(spec.name, uri, top)
    console = Console()
    counts = Table(title=f"sweep {spec.name}")
    counts.add_column("stage")
    for state in STATES:
        counts.add_column(state, justify="right")
    for phase, by_state in result.counts.items():
        counts.add_row(phase, *(str(by_state[state]) for state in STATES))
    console.print(counts)
    for judged in result.rounds:
        typer.echo(judged.line())
    show_table("best trials so far (binary test accuracy %)", ("trial", "status", "epoch", "test_acc_binary"),
               [(score.name, score.status, str(score.epoch), f"{score.test_acc_binary:.2f}") for score in result.best],
               whole=("trial",), console=console)
    if result.unfinished:
        show_table("failed and interrupted trials (`bnew sweep resume` retries them)", ("trial", "state", "reason"),
                   [(trial.name, trial.state, trial.error) for trial in result.unfinished], whole=("trial",),
                   console=console)
    for trial in result.unfinished:
        if trial.log_tail:
            console.print(f"last lines of {trial.name}'s log (logs/trial.log):", highlight=False)
            console.print(Text(textwrap.indent(trial.log_tail, "  | ")), style="dim")


@sweep_app.command("report")
def report_command(
    name: str = typer.Argument(..., help="Sweep name (its MLflow experiment)."),
    fmt: str = typer.Option("md", "--format", help="md | csv | latex"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder. Default: reports/NAME."),
    tracking_uri: Optional[str] = typer.Option(
        None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI. Default: the preset's, else .bnew/mlflow.db."
    ),
    compare_to: Optional[str] = typer.Option(
        None, help="Row or column label to t-test every cell against (e.g. ste), instead of the spec's baseline."
    ),
    log: bool = typer.Option(True, "--log/--no-log", help="Also log the files to the parent run under report/."),
    select: Optional[str] = typer.Option(
        None, help="final | best_val: the epoch each run reports (default: the spec's report.select)."
    ),
) -> None:
    """Report a sweep from its MLflow runs: claims, tables, teachers, failed trials and plots.

    A verdict per claim of the spec's `report.claims` (effect ± s.e., its t-test paired by seed
    where the cells share seeds, else Welch's, p adjusted by report.correction, the seeds that
    would decide it, the paper's effect); a table per grid and dataset (rows and columns from the
    spec's `report:` section) with mean ± std over seeds, seed counts, the same tests against the
    baseline and the paper's values; missing cells are marked. Files go to --out and to the
    sweep's parent run.
    """
    from sweeps.analysis.report import default_tracking_uri, write_report
    from sweeps.analysis.tables import SELECTION_NOTES

    if select not in (None, *SELECTION_NOTES):
        fail(f"--select: {select!r} is not one of {', '.join(SELECTION_NOTES)}")
    uri = tracking_uri or default_tracking_uri(name)
    with user_errors(), reaching(uri):
        report = write_report(uri, name, out, fmt, compare_to, log, select)
    typer.echo(report.text)
    if not report.tables:
        typer.echo("no quantise or real-valued trials in this sweep yet", err=True)
    typer.echo("wrote " + ", ".join(str(path) for path in report.files), err=True)
