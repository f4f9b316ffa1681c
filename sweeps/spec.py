"""Import shim, for one release: Tune experiments recorded before `sweeps/` was split into layers
pickled specs (and the models inside them) by this module's path. Use `sweeps.core.spec`."""

from sweeps.core.spec import (  # noqa: F401
    Axes,
    CheckpointSettings,
    ClaimSpec,
    PaperEffect,
    PhaseSettings,
    ReportSpec,
    Resources,
    SchedulerSettings,
    SearchSettings,
    SearchSpace,
    Selector,
    SweepSpec,
)
