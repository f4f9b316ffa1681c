"""The driver's stop signals, without Ray: SIGTERM (what `ray job stop` sends) and SIGINT reach
Tune's own stop handler (which Tune installs for SIGUSR1 while `fit()` runs), a second signal
stops at once, and the driver's handlers are put back afterwards. (A real Ctrl-C on a real sweep
is in test_faults.py.)"""

from __future__ import annotations

import os
import signal

import pytest

from sweeps.run.interrupt import Interruption


class FakeTuner:
    """Does what `Tuner.fit()` does with signals: installs a stop handler for SIGUSR1, then runs
    until it is called; here it sends `signals` to this process while it 'runs'."""

    def __init__(self, *signals: signal.Signals):
        self.signals, self.stopped_by = signals, []

    def fit(self) -> None:
        signal.signal(signal.SIGUSR1, lambda number, frame: self.stopped_by.append(number))
        for number in self.signals:
            os.kill(os.getpid(), number)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_goes_to_tunes_stop_and_is_remembered(number: signal.Signals) -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    interruption, tuner = Interruption(), FakeTuner(number)
    interruption.fit(tuner)
    assert tuner.stopped_by == [number] and interruption.signal_name == number.name
    assert {sig: signal.getsignal(sig) for sig in before} == before
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
    later = FakeTuner()
    interruption.fit(later)  # a stopped sweep starts no further Tuner
    assert later.stopped_by == []


def test_a_second_signal_stops_at_once() -> None:
    interruption = Interruption()
    with pytest.raises(KeyboardInterrupt):
        interruption.fit(FakeTuner(signal.SIGTERM, signal.SIGTERM))
    assert interruption.signal_name == "SIGTERM"


def test_a_signal_before_tune_is_running_stops_at_once() -> None:
    class NotYetRunning:
        def fit(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        Interruption().fit(NotYetRunning())
