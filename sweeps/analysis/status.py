"""Progress of a sweep, read from MLflow only: the spec stored on the parent run is planned
again, the sweep's trial runs are read in one scan, and each stage not finished there is looked
up by its key (a stage finished by another sweep counts as done)."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities import Run

from bnew_core.config import BnewError
from sweeps.analysis.rounds import Round, next_reach, recorded_rounds
from sweeps.core.plan import Plan, build_plan
from sweeps.core.rounds import round_points
from sweeps.core.schema import (
    CAP_TAGS,
    CELL_TAG,
    ERROR_TAG,
    FINAL_PHASES,
    LOG_TAIL_TAG,
    PHASES,
    RUN_STATUS_TO_STATE,
    STATES,
    STOPPED_EARLY_TAG,
    axis_tag,
    stage_state,
)
from sweeps.core.search import searched_templates
from sweeps.core.spec import parse_spec
from sweeps.records.store import store_exists
from sweeps.records.tracker import Tracker


@dataclass
class TrialScore:
    name: str
    status: str
    test_acc_binary: float
    epoch: int


@dataclass
class UnfinishedTrial:
    """A stage whose latest run failed or was interrupted, and why (`bnew.error`)."""

    name: str
    state: str
    error: str
    log_tail: str = ""
    """The last lines of its log (`sweeps.records.trial_log`)."""


@dataclass
class SweepStatus:
    plan: Plan
    counts: dict[str, dict[str, int]]
    """Phase -> state -> number of stages."""
    best: list[TrialScore]
    unfinished: list[UnfinishedTrial]
    runs: dict[str, list[Run]]
    """Stage key -> its trial runs, newest first."""
    sweep_run_status: str
    """MLflow status of the parent run: RUNNING while a driver runs the sweep."""
    rounds: list[Round]
    """The seed rounds the sweep has judged (none without `axes.seed` rounds)."""


def sweep_status(name: str, tracking_uri: str, top: int = 10) -> SweepStatus:
    if not store_exists(tracking_uri):
        raise BnewError(f"{name}: no MLflow store at {tracking_uri}")
    tracker = Tracker(tracking_uri)
    experiment_id = tracker.experiment_id(name, create=False)
    if experiment_id is None:
        raise BnewError(f"{name}: no MLflow experiment of that name at {tracking_uri}")
    parent = tracker.sweep_run(experiment_id)
    if parent is None:
        raise BnewError(f"{name}: experiment has no sweep run (bnew.role=sweep)")
    stored = tracker.sweep_spec(parent.info.run_id)
    if stored is None:
        raise BnewError(f"{name}: the sweep's parent run has no spec.yaml to plan its stages from")
    spec = parse_spec(stored, f"{name}/spec.yaml")
    caps = {key: int(parent.data.tags[tag]) if parent.data.tags.get(tag) else None for key, tag in CAP_TAGS.items()}
    rounds = spec.axes.seed_rounds
    played = recorded_rounds(parent.data.tags) if rounds else []
    points = round_points(spec, next_reach(rounds, played)) if rounds else None  # the round it is in
    plan = build_plan(spec, f"{name}/spec.yaml", **caps, points=points)
    sweep_runs = tracker.trial_runs(experiment_id)
    runs_by_key = tracker.stage_runs(list(plan.stages), sweep_runs)
    templates = searched_templates(plan)  # searched, not run as they are
    counts = {phase: dict.fromkeys(STATES, 0) for phase in PHASES
              if any(stage.key not in templates for stage in plan.of_phase(phase))}
    for key, stage in plan.stages.items():
        if key not in templates:
            counts[stage.phase][stage_state(runs_by_key[key])] += 1
    for run in sweep_runs:  # the searches' trials, one row per tuned phase
        if CELL_TAG in run.data.tags:
            state = "stopped" if STOPPED_EARLY_TAG in run.data.tags else RUN_STATUS_TO_STATE.get(run.info.status, "failed")
            counts.setdefault(f"tuned {run.data.tags[axis_tag('stage')]}", dict.fromkeys(STATES, 0))[state] += 1
    scores = [
        TrialScore(run.info.run_name, run.info.status, run.data.metrics["test_acc_binary"],
                   int(run.data.metrics.get("epoch", -1)))
        for run in sweep_runs
        if "test_acc_binary" in run.data.metrics and run.data.tags.get(axis_tag("stage")) in FINAL_PHASES
    ]
    best = sorted(scores, key=lambda score: -score.test_acc_binary)[:top]
    unfinished = [
        UnfinishedTrial(run.info.run_name, RUN_STATUS_TO_STATE[run.info.status], run.data.tags.get(ERROR_TAG, ""),
                        run.data.tags.get(LOG_TAIL_TAG, ""))
        for key in plan.stages
        if stage_state(runs_by_key[key]) in ("failed", "interrupted")
        for run in runs_by_key[key][:1]  # the newest
    ]
    return SweepStatus(plan=plan, counts=counts, best=best, unfinished=unfinished, runs=runs_by_key,
                       sweep_run_status=parent.info.status, rounds=played)
