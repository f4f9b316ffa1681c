"""What a sweep writes into MLflow and reads back: the phases, the tags on its runs, and the
states a stage can be in. Every layer names a tag or a state through this module."""

from __future__ import annotations

from typing import Any, Iterable

PHASES = ("teacher", "pretrain", "quantise", "real")
"""Stage phases in plan order."""
FINAL_PHASES = ("quantise", "real")
"""Phases whose runs are the sweep's trials and fill its result tables; the others are prerequisites."""
AXES = ("dataset", "optimiser", "ablation", "seed", "budget", "distillation")
"""The grid's own axes; `axes.params` crosses any other trainer field."""

TAG_PREFIX = "bnew."
ROLE_TAG = "bnew.role"
"""`sweep` on a sweep's parent run, `trial` on each of its trial runs."""
SWEEP_TAG = "bnew.sweep"
STAGE_KEY_TAG = "bnew.stage_key"
"""A trial run's stage (content key): a FINISHED run with it, in any experiment, makes the stage reusable."""
PARAM_TAG_PREFIX = "bnew.param."
"""`bnew.param.<dotted key>`: a trial's value of an `axes.params` axis."""
MLFLOW_PARENT_TAG = "mlflow.parentRunId"
REUSED_FROM_TAG = "bnew.reused_from"
"""On a trial run that did not train: the run id of the run that trained its stage."""
RESUMED_FROM_TAG = "bnew.resumed_from_epoch"
"""On a trial run continued from a checkpoint: the epoch it continued from."""
STOPPED_EARLY_TAG = "bnew.stopped_early"
"""On a tuned trial's KILLED run: a Tune scheduler (ASHA, median) stopped it before its budget."""
CELL_TAG = "bnew.cell"
"""On every trial of a tuned cell (its search trials and its repeats): the cell's label."""
ERROR_TAG = "bnew.error"
"""Why a run failed or was stopped (one line)."""
FINAL_FAILURE_TAG = "bnew.final_failure"
"""On a FAILED run: no retry can fix it (a `BnewError`: bad input, divergence)."""
SUPERSEDED_BY_TAG = "bnew.superseded_by"
"""On a KILLED trial run that lost its stage's lease (paused or cut off past the timeout): the run
that took the stage over and is its result."""
LOG_TAIL_TAG = "bnew.log_tail"
"""The last lines of a failed trial's log."""
INTERRUPTED_TAG = "bnew.interrupted"
"""On the parent run: the signal that stopped the sweep."""
CAP_TAGS = {"max_epochs": "bnew.max_epochs", "max_batches": "bnew.max_batches"}
"""On the parent run: the debug caps the plan was built with (they change stage keys)."""
ROUND_TAG_PREFIX = "bnew.round."
"""On the parent run of a sweep with seed rounds: `bnew.round.<number>`, each claim's state after
that round (JSON of `sweeps.analysis.rounds.ClaimLook`s)."""
ESTIMATE_TAG = "bnew.estimate"
"""On the parent run: the hours the sweep was estimated to take when it first started (JSON of
`sweeps.analysis.cost.Estimate`), which its report sets against the hours it took."""
DEVICE_TAGS = {"device": "bnew.device", "gpu_ids": "bnew.gpu_ids", "device_fallback": "bnew.device_fallback"}
"""On a trial run, from `bnew_core.device.DeviceChoice.record()`: the device it trained on, the GPU
ids Ray gave it (CUDA_VISIBLE_DEVICES as the trial saw it) and, when `auto` found no GPU, why."""

STATES = ("pending", "running", "done", "failed", "interrupted", "stopped")
"""A stage's state; `stopped`: a tuned trial a scheduler stopped early (not a failure)."""
RUN_STATUS_TO_STATE = {"FINISHED": "done", "RUNNING": "running", "SCHEDULED": "running", "FAILED": "failed",
                       "KILLED": "interrupted"}


def quote(value: str) -> str:
    """A value in an MLflow search filter (`tags.`bnew.stage_key` = 'k'`)."""
    return "'" + value.replace("'", "\\'") + "'"


def tag_value(axis: str, value: Any) -> str:
    """A spec value as trial tags spell it (distillation `yes`/`no`, numbers as text)."""
    if axis == "distillation" and isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def axis_tag(axis: str) -> str:
    """The tag of a grid axis (`bnew.optimiser`) or of an `axes.params` key (`bnew.param.lr`)."""
    return f"{TAG_PREFIX}{axis}" if axis in (*AXES, "grid", "stage") else f"{PARAM_TAG_PREFIX}{axis}"


CELL_TAGS = tuple(axis_tag(axis) for axis in ("grid", *AXES) if axis != "seed")
"""Tags that place a trial in its cell (with `bnew.param.*`): all its axes but the seed."""


def cell_of(tags: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A trial's cell from its tags: its axes but the seed (a tuned cell: its label), as sorted tag pairs."""
    if CELL_TAG in tags:
        return ((CELL_TAG, tags[CELL_TAG]), (axis_tag("grid"), tags.get(axis_tag("grid"), "")))
    return tuple(sorted((key, value) for key, value in tags.items()
                        if key in CELL_TAGS or key.startswith(PARAM_TAG_PREFIX)))


def cell_label(tags: dict[str, str]) -> str:
    """`cell_of` in words: `grid=main dataset=digits optimiser=ste ...`."""
    return " ".join(f"{key.removeprefix(TAG_PREFIX)}={value}" for key, value in cell_of(tags) if value)


def stage_state(runs: Iterable[Any]) -> str:
    """pending | running | done | interrupted | failed, from a stage's MLflow runs (a finished one
    anywhere wins)."""
    states = {RUN_STATUS_TO_STATE.get(run.info.status, "failed") for run in runs}
    for state in ("done", "running", "interrupted", "failed"):
        if state in states:
            return state
    return "pending"
