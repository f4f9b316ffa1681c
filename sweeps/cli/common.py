"""What every command shares: a user's error as one line and exit status 2, loading a spec into
a checked plan, and the options' help texts. Heavy packages are imported inside the functions
that need them, so `bnew --help` starts in well under a second."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Optional

import typer

if TYPE_CHECKING:
    from sweeps.core.plan import Plan
    from sweeps.core.spec import SweepSpec

SPEC_HELP = "Sweep spec YAML, or a preset name (see `bnew sweep list`)."
MAX_EPOCHS_HELP = "Cap every stage's epochs (a dry run: capped stages get their own keys)."
MAX_BATCHES_HELP = "Cap batches per epoch (a dry run, like --max-epochs)."
YES_HELP = "Plan or run a sweep of more than 1,000 trials."
SET_HELP = ("Change a setting of the spec, as its YAML would: KEY=VALUE with a dotted key, repeatable "
            "(--set resources.gpu=0 --set 'axes.seed=[0,1,2]' --set base.batch_size=256).")
WAIT_HELP = ("When no node of the cluster can hold a trial's resources, wait for one to join (an autoscaling "
             "cluster) instead of exiting with status 2.")
VERBOSE_HELP = "Tune's own progress tables and the workers' output on this console (default: the compact view)."
ADDRESS_HELP = "Ray cluster to run on (ray://HOST:10001 or HOST:6379). Default: RAY_ADDRESS, a running local Ray, or a new one."
INTERRUPTED_EXIT = 130
"""Exit status of a sweep stopped by a signal (as a shell reports Ctrl-C)."""


def fail(message: str) -> NoReturn:
    """Exit with status 2 and a one-line reason on stderr."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A `BnewError` (bad input, a check that failed) becomes `fail`'s one line and exit 2."""
    from bnew_core.config import BnewError  # lazy: pydantic's models cost `--help` a third of a second

    try:
        yield
    except BnewError as exc:
        fail(str(exc))


@contextlib.contextmanager
def reaching(tracking_uri: str) -> Iterator[None]:
    """An MLflow error (a dead or unreachable tracking server) becomes `fail`'s one line and exit 2."""
    from mlflow.exceptions import MlflowException  # lazy: start-up (MLflow takes a second to import)

    try:
        yield
    except MlflowException as exc:
        fail(f"tracking_uri: {tracking_uri} is not reachable ({str(exc).splitlines()[0][:160]})")


def load_sweep_plan(spec_arg: str, max_epochs: Optional[int], max_batches: Optional[int], settings: list[str] = (),
                    on_this_machine: bool = True, yes: bool = True, tracking: bool = True,
                    data: bool = True) -> tuple["SweepSpec", "Plan"]:
    """Spec (with `--set` SETTINGS) and its checked plan (`sweeps.run.checks.checked_plan`), or exit 2
    naming the bad key, before Ray or MLflow start."""
    from sweeps.core.spec import load_spec  # lazy: the CLI starts before it knows the command
    from sweeps.run.checks import checked_plan  # lazy: as above

    check_caps(max_epochs, max_batches)
    overrides = parse_set_option(list(settings))
    with user_errors():
        spec = load_spec(spec_arg, overrides)
        return spec, checked_plan(spec, spec_arg, max_epochs, max_batches, yes, on_this_machine, tracking, data)


def check_caps(max_epochs: Optional[int], max_batches: Optional[int]) -> None:
    """--max-epochs and --max-batches, when given, are positive (else exit 2)."""
    for option, value in (("--max-epochs", max_epochs), ("--max-batches", max_batches)):
        if value is not None and value <= 0:
            fail(f"{option}: must be positive, got {value}")


def parse_set_option(items: list[str]) -> dict[str, Any]:
    """`--set optimiser.lambda_rate=0.05` pairs, values parsed as YAML scalars."""
    import yaml  # lazy: start-up
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--set {item!r}: expected KEY=VALUE, e.g. optimiser.lambda_rate=0.05")
        overrides[key.strip()] = yaml.safe_load(raw)
    return overrides
