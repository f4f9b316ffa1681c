"""A node whose clock is off: `bench.chaos` starts a Ray node with this folder first on PYTHONPATH
and BNEW_CHAOS_CLOCK_SHIFT_S set, so every Python process of the node (its workers, the trials,
their MLflow clients) reads the wall clock that many seconds off; monotonic clocks are untouched,
as between two machines. Python-level, because libfaketime 0.9.10 cannot run a Ray node: under it
`time.sleep` fails with EINVAL (monotonic clock real) or sleeps the shift (monotonic clock faked)."""

import os
import time

_shift_s = float(os.environ.get("BNEW_CHAOS_CLOCK_SHIFT_S", "0"))
if _shift_s:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _shift_s
    time.time_ns = lambda: _time_ns() + int(_shift_s * 1e9)
