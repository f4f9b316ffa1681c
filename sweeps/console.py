"""Import shim, for one release: Tune experiments recorded before `sweeps/` was split into layers
pickled their callback by this module's path (`bnew sweep resume` restores it). Use `sweeps.run.events`."""

from sweeps.run.events import TuneEvents  # noqa: F401
