"""Search planning: which final stages an Optuna search tunes, grouped by cell, and what the
searches add to a sweep's size. Optuna picks the params only while the sweep runs
(`sweeps.run.tuning`), so a search is counted by its trials, not by the stages the plan holds
for it (its cells' templates, never trained as they are)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from sweeps.core.dotted import deep_merge, nest
from sweeps.core.plan import Plan, Role, Stage, new_stage, param_applies
from sweeps.core.schema import CELL_TAG, FINAL_PHASES, axis_tag
from sweeps.core.spec import SweepSpec


@dataclass
class TunedCell:
    """A point of the grid without its seed and its tuned params: one search."""

    label: str
    """Its final stages' run name without the seed (`demo/bnew/baseline/budget4`)."""
    templates: list[Stage]
    """The plan's final stage per seed (tuned params at their settings' value), first seed first:
    the repeats of each suggestion."""

    @property
    def experiment_name(self) -> str:
        return f"{self.label.replace('/', '_')}-{self.templates[0].key[:8]}"


def tuned_cells(plan: Plan) -> list[TunedCell]:
    """The plan's final stages that a search tunes, by cell."""
    tuned = plan.spec.tuned_params()
    cells: dict[str, TunedCell] = {}
    for stage in plan.stages.values():
        optimiser = stage.roles[0].tags[axis_tag("optimiser")]
        if stage.phase in FINAL_PHASES and any(param_applies(key, optimiser) for key in tuned):
            label = stage.name.rpartition("/seed")[0]
            cells.setdefault(label, TunedCell(label, [])).templates.append(stage)
    return list(cells.values())


def searched_templates(plan: Plan) -> set[str]:
    """The plan's stage keys that stand for searched stages: never trained or counted as they are."""
    return {template.key for cell in tuned_cells(plan) for template in cell.templates}


@dataclass
class SearchSize:
    """What the plan's searches train, as counts."""

    cells: int
    trials: int
    """Search trials: `search.samples` suggestions per cell, each trained on every seed of the cell."""
    epochs: int
    """At most: every trial trains its full budget unless the scheduler stops it."""


def search_size(plan: Plan) -> SearchSize:
    cells = tuned_cells(plan)
    runs = [(plan.spec.search.samples * len(cell.templates), cell.templates[0].epochs) for cell in cells]
    return SearchSize(len(cells), sum(trials for trials, _ in runs), sum(trials * epochs for trials, epochs in runs))


class PlannedCounts(NamedTuple):
    trials: int
    runs: int
    """Trials and prerequisites."""
    epochs: int


def planned_counts(plan: Plan) -> PlannedCounts:
    """The sweep's size, each search counted as the trials it runs (not as its cells' templates)."""
    size, templates = search_size(plan), searched_templates(plan)
    return PlannedCounts(len(plan.trial_roles()) - len(templates) + size.trials,
                         len(plan.stages) - len(templates) + size.trials,
                         plan.epochs(set(plan.stages) - templates) + size.epochs)


def trial_count(spec: SweepSpec, points: list[dict[str, Any]]) -> int:
    """The sweep's trials from its grid points alone, before any stage is built: a point a search
    tunes is `search.samples` trials (each suggestion on that point's seed), any other one trial.
    The same count as `planned_counts(build_plan(spec)).trials`, at a fraction of the cost."""
    tuned = spec.tuned_params()
    samples = spec.search.samples if tuned else 0
    return sum(samples if any(param_applies(key, point["optimiser"]) for key in tuned) else 1 for point in points)


def cell_params(spec: SweepSpec, template: Stage) -> list[str]:
    """The tuned params that apply to the cell's optimiser."""
    optimiser = template.roles[0].tags[axis_tag("optimiser")]
    return [key for key in spec.tuned_params() if param_applies(key, optimiser)]


def tuned_stage(template: Stage, params: dict[str, Any], label: str) -> Stage:
    """The template's stage with `params` (dotted keys) set: its own content key, run name and tags."""
    stage = new_stage(template.phase, deep_merge(template.config, nest(params)), template.inputs, template.name)
    shown = "/".join(f"{key.rpartition('.')[2]}={value:.4g}" if isinstance(value, float) else
                     f"{key.rpartition('.')[2]}={value}" for key, value in params.items())
    tags = {**template.roles[0].tags, CELL_TAG: label, **{axis_tag(key): str(value) for key, value in params.items()}}
    stage.roles.append(Role(name=f"{template.name}/{shown}", tags=tags))
    return stage
