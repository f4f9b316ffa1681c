"""Import shim, for one release: Tune experiments recorded before `sweeps/` was split into layers
pickled these names by this module's path (`bnew sweep resume` restores them). Use `sweeps.run`."""

from sweeps.run.stage_graph import StageScheduler, trial_dirname, trial_name  # noqa: F401
from sweeps.run.trial import tune_trial  # noqa: F401
