"""`sweeps.plan` from Python: the checked plan the CLI's commands make too (`checks.checked_plan`),
its stages as a DataFrame, the stages MLflow has finished and the cost estimate, as `bnew sweep
plan` prints them."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from sweeps.analysis.cost import Estimate, estimate
from sweeps.core.plan import Plan
from sweeps.core.schema import cell_label
from sweeps.core.spec import SweepSpec
from sweeps.records.store import store_exists
from sweeps.records.tracker import Tracker
from sweeps.run.checks import checked_plan
from sweeps.run.resources import trial_resources, visible_slots


@dataclass
class PlannedSweep:
    """What `sweeps.plan` returns: the plan, the stages MLflow has finished, and the cost estimate."""

    plan: Plan
    reused: set[str]
    """Keys of the stages finished in MLflow already (this sweep's or another's): not trained again."""
    estimate: Estimate

    @property
    def stages(self) -> pd.DataFrame:
        """One row per stage: its name, key, phase, cell, epochs, the stages it reads models from
        (`inputs`: config field -> key), how many trials share it and whether it is reused."""
        return pd.DataFrame([
            {"stage": stage.name, "key": key, "phase": stage.phase, "cell": cell_label(stage.roles[0].tags),
             "epochs": stage.epochs, "inputs": dict(stage.inputs), "trials": len(stage.roles), "reused": key in self.reused}
            for key, stage in self.plan.stages.items()
        ], columns=["stage", "key", "phase", "cell", "epochs", "inputs", "trials", "reused"])


def plan(spec: SweepSpec, max_epochs: int | None = None, max_batches: int | None = None, yes: bool = False,
         lookup: bool = True, address: str | None = None) -> PlannedSweep:
    """Plan `spec` (from `sweeps.load`) as `bnew sweep plan` does: with `lookup`, the stages
    MLflow has finished are reused; the estimate's wall time is on the trial slots of the Ray
    cluster at `address` (else RAY_ADDRESS), else of this machine's CPUs."""
    sweep_plan = checked_plan(spec, None, max_epochs, max_batches, yes, tracking=lookup, data=False)
    uri = spec.resolved_tracking_uri()
    tracker = Tracker(uri) if lookup and store_exists(uri) else None
    reused = set(tracker.finished_stages(list(sweep_plan.stages))) if tracker else set()
    slots, where = visible_slots(trial_resources(spec), address)
    return PlannedSweep(sweep_plan, reused, estimate(sweep_plan, set(sweep_plan.stages) - reused, slots, where, tracker))
