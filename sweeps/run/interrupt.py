"""Stopping a sweep from outside: Ctrl-C (SIGINT), or SIGTERM (what `ray job stop` sends).

Ray Tune stops a run itself when it gets SIGINT or SIGUSR1 (`ray/tune/tune.py`): it saves the
experiment state, so `Tuner.restore` continues it, stops the trials and returns from `fit()`.
While Tune runs, the driver takes SIGINT and SIGTERM itself (Tune is told to leave SIGINT alone,
and `ray.init` would turn SIGTERM into an exit that skips all of that), notes which signal came,
so the sweep's unfinished runs are recorded as KILLED, and hands it to Tune's stop. A second
signal raises `KeyboardInterrupt` at once, as Tune's own handler does."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interruption:
    """Which stop signal, if any, reached the driver while Tune ran."""

    def __init__(self) -> None:
        self.signal_name: str | None = None

    def fit(self, tuner: Any) -> None:
        """`tuner.fit()`, stopped the way Tune stops on Ctrl-C by SIGINT and SIGTERM alike."""
        if self.signal_name is not None:  # stopped before this Tuner started
            return
        with self.routed_to_tune():
            tuner.fit()  # failures are read back from MLflow by the caller

    @contextlib.contextmanager
    def routed_to_tune(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        previous_usr1 = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # not a stale handler of an earlier fit
        disable = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for number in STOP_SIGNALS:
            signal.signal(number, self.handle)
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            signal.signal(signal.SIGUSR1, previous_usr1)
            if disable is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER")
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = disable

    def handle(self, number: int, frame: Any) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)  # Tune's stop handler, once its run loop is set up
        if self.signal_name is not None or not callable(tune_stop):
            self.signal_name = self.signal_name or signal.Signals(number).name
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(number).name
        print(f"{self.signal_name}: stopping the sweep (again to stop at once); "
              "`bnew sweep resume` continues it", flush=True)
        tune_stop(number, frame)
