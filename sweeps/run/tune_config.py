"""Ray Tune settings shared by a sweep's stage graph and its searches: where Tune keeps a sweep's
experiments, the trainable and its resources, and the run config (failures, checkpoints, the
console's events)."""

from __future__ import annotations

from typing import Any, Callable

from ray import tune

from sweeps.core.spec import SweepSpec
from sweeps.run.events import TuneEvents
from sweeps.run.resources import trial_resources
from sweeps.run.trial import tune_trial

TUNING_FOLDER = "tuning"
"""Beside the sweep's Tune experiments: one experiment per tuned cell (never taken for the sweep's)."""
REUSE_ACTORS = True
"""A trial's actor trains the next trial too: a new one spends ~6 s importing torch, Ray Train and
MLflow (bench/RESULTS.md), the most of what a short trial costs. Every trial seeds its own generators
and has its own MLflow client, output capture and working folder, so nothing carries over; Tune
starts a new actor when the last trial's thread has not ended."""


def tune_storage(spec: SweepSpec) -> str:
    """One folder per sweep; each `bnew sweep run` adds a Tune experiment inside it."""
    return f"{spec.resolved_storage_path().rstrip('/')}/{spec.name}"


def trainable(spec: SweepSpec, function: Callable[[dict[str, Any]], None] = tune_trial) -> Any:
    return tune.with_resources(function, trial_resources(spec))


def tune_run_config(spec: SweepSpec, name: str, verbose: bool = False) -> tune.RunConfig:
    """`verbose`: Tune's own progress tables; otherwise the registered event sinks show the sweep."""
    return tune.RunConfig(
        name=name,
        storage_path=tune_storage(spec),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        # Tune snapshots its experiment state every TUNE_GLOBAL_CHECKPOINT_S ("auto": at least
        # 10 s apart, about 5% of the driver's time) and forces one when a trial has registered
        # num_to_keep checkpoints since the last: rare at the spec's checkpoint interval.
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        verbose=1 if verbose else 0,
        callbacks=[TuneEvents()],
    )
