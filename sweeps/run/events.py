"""What happens to a sweep's trials while it runs, for whoever shows it: Tune's trial events go
to every registered sink. The console (`sweeps.ui.console`) registers itself as one, so this
layer never imports the view, the way Ray Tune's searchers never import its execution.

Tune pickles its callbacks with the experiment, so `TuneEvents` holds no state: the sinks live
in this driver process's `SINKS`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from ray.tune import Callback

from sweeps.core.plan import Stage


class EventSink(Protocol):
    """Receives a sweep's trial events (a stage by its key)."""

    def started(self, stage: Stage, epochs_done: int) -> None: ...
    def result(self, key: str, result: dict[str, Any]) -> None: ...
    def finished(self, key: str) -> None: ...
    def failed(self, key: str, reason: str) -> None: ...
    def retrying(self, key: str, reason: str) -> None: ...
    def tick(self) -> None: ...
    def line(self, text: str) -> None: ...


SINKS: list[EventSink] = []
"""The sinks of the sweep this driver runs now."""
STAGE_FAILED, STAGE_ERROR = "bnew_failed", "bnew_error"
"""Keys of the last Tune result of a trial that failed for a reason a retry cannot fix (a
`BnewError`: bad input, divergence), and its reason: the trial ends without Tune retrying it."""
WAITING_KEY = "bnew_waiting"
"""A trial's Tune result that says which sweep it waits for (`sweeps.records.leases`)."""


def say(text: str, log: Callable[[str], None]) -> None:
    """A line on every sink (the live console holds stdout while it shows), else to `log`."""
    for sink in SINKS:
        sink.line(text)
    if not SINKS:
        log(text)


def error_reason(trial: Any) -> str:
    """The last line of the trial's error (the exception and its message)."""
    try:
        # Tune writes the error beside the trial on the driver just before this callback and
        # copies it to the storage (which `get_error` reads) only later.
        local = Path(trial.error_file) if trial.error_file else None
        error = local.read_text() if local is not None and local.is_file() else trial.get_error()
    except Exception:  # the error file may be gone or unreadable; the state still counts
        error = None
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no error recorded"


def trial_stage_of(trial: Any) -> Stage:
    """The stage a trial of the stage graph trains (its Tune config holds it)."""
    return Stage.from_dict(trial.config["stage"])


def stage_key(trial: Any) -> str:
    return trial.config["stage"]["key"]


class TuneEvents(Callback):
    """Tune's trial events to the registered sinks."""

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        done = trial.last_result.get("epoch") if trial.last_result else None
        for sink in SINKS:
            sink.started(trial_stage_of(trial), 0 if done is None else int(done) + 1)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for sink in SINKS:
            if "epoch" in result:
                sink.result(stage_key(trial), result)
            elif WAITING_KEY in result:
                sink.line(f"wait   {trial_stage_of(trial).name}: {result[WAITING_KEY]}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        for sink in SINKS:
            if result.get(STAGE_FAILED):  # ended without a retry, not done
                sink.failed(stage_key(trial), str(result.get(STAGE_ERROR, "no error recorded"))[:300])
            else:
                sink.finished(stage_key(trial))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for sink in SINKS:
            sink.retrying(stage_key(trial), error_reason(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        for sink in SINKS:
            sink.failed(stage_key(trial), error_reason(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        for sink in SINKS:
            sink.tick()
