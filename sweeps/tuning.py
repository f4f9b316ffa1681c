"""Import shim, for one release: searches recorded before `sweeps/` was split into layers pickled
their scheduler, callbacks and trial names by this module's path (`bnew sweep resume` restores
them). Use `sweeps.run.tuning`."""

from sweeps.run.tuning import PerSeed, StoppedEarly, grace_epochs, trial_stage, tuning_trial  # noqa: F401
