"""`sweeps.run` from Python: the checked plan and the sweep as `bnew sweep run` runs them, with the
console's plain lines (start, done, failed, retry, progress) as records of the `sweeps` logger,
which prints them on stderr unless the program configured it: a notebook shows each line once,
and `logging.getLogger("sweeps").setLevel("WARNING")` silences them."""

from __future__ import annotations

import io
import logging

import ray
from rich.console import Console

from sweeps.core.plan import Stage
from sweeps.core.spec import SweepSpec
from sweeps.run.checks import checked_plan
from sweeps.run.driver import run_sweep
from sweeps.run.outcome import SweepOutcome
from sweeps.ui.console import SweepConsole, SweepView

LOGGER = logging.getLogger("sweeps")


class LoggerFile(io.TextIOBase):
    """A text file whose lines become INFO records of `logger`."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.logger.info(line)
        return len(text)


def log_to_console() -> None:
    """A stderr handler for the `sweeps` logger at INFO, unless the program gave it a handler or
    a level (and only once: a notebook runs its cells again)."""
    if not LOGGER.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.propagate = False  # the root logger's handlers would print each line twice
    if LOGGER.level == logging.NOTSET:
        LOGGER.setLevel(logging.INFO)


def show_logged(stages: list[Stage], reused: set[str]) -> SweepConsole:
    """The console's plain lines, as log records (no live view: a log has no terminal)."""
    console = SweepConsole(SweepView.of_stages(stages, reused=len(reused)),
                           console=Console(file=LoggerFile(LOGGER), force_terminal=False, width=160))
    console.open()
    return console


def run(spec: SweepSpec, local: bool = False, address: str | None = None, max_epochs: int | None = None,
        max_batches: int | None = None, yes: bool = False, wait_for_resources: bool = False) -> SweepOutcome:
    """Train every stage of `spec` (from `sweeps.load`) that MLflow has not finished, on Ray Tune,
    after every check `bnew sweep run` makes (size, storage, data, resources, tracking): a
    `BnewError` names what is wrong before any trial starts. `local`: a Ray of this process's own;
    `address`: a cluster's (default: RAY_ADDRESS, a running local Ray, or a new one)."""
    log_to_console()
    plan = checked_plan(spec, None, max_epochs, max_batches, yes)
    try:
        return run_sweep(spec, plan, LOGGER.info, address=address, local=local, show=show_logged,
                         wait_for_resources=wait_for_resources)
    finally:
        ray.shutdown()  # disconnect from (or stop the local) Ray, as the CLI does
