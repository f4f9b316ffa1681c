"""Which grid points a round of adaptive seeds runs (`axes.seed: {start, step, max}`): every
cell runs the first round's seeds; a cell compared by a claim runs as many seeds as the most
any of its claims has reached. The rounds themselves are run by `sweeps.run.rounds`, and decided
by `sweeps.analysis.rounds`."""

from __future__ import annotations

from typing import Any

from sweeps.core.plan import Plan, build_plan, grid_points
from sweeps.core.schema import tag_value
from sweeps.core.spec import ClaimSpec, SweepSpec


def claim_covers(claim: ClaimSpec, point: dict[str, Any]) -> bool:
    """Whether `point` is in one of the cells `claim` compares."""
    return any(all(tag_value(axis, point.get(axis)) == value for axis, value in selector.items())
               for selector, _ in claim.cells())


def round_points(spec: SweepSpec, reached: dict[str, int]) -> list[dict[str, Any]]:
    """The grid points of a round: `reached` maps each claim's name to the seeds its cells run
    now (a look of the rounds); cells no claim compares, and claims not in `reached`, run the
    first round's seeds."""
    rounds = spec.axes.seed_rounds
    if rounds is None:
        raise ValueError(f"{spec.name}: axes.seed is a list, not rounds")
    claims = spec.report.claims if spec.report else []
    most = max([rounds.start, *reached.values()])
    spec_at_most = spec.model_copy(update={"axes": spec.axes.model_copy(update={"seed": rounds.seeds(most)})})

    def seeds_of(point: dict[str, Any]) -> int:
        return max([rounds.start, *(reached.get(claim.name, rounds.start) for claim in claims
                                    if claim_covers(claim, point))])

    return [point for point in grid_points(spec_at_most) if point["seed"] < rounds.first + seeds_of(point)]


def rounds_summary(first: Plan) -> str:
    """What `bnew sweep plan` says of a sweep with seed rounds, whose plan is the first round's:
    the rounds, and the most they can add (every claim undecided to the last round)."""
    spec = first.spec
    rounds = spec.axes.seed_rounds
    if rounds is None or spec.report is None:
        raise ValueError(f"{spec.name}: axes.seed is a list, not rounds")
    most = build_plan(spec, spec.name, first.max_epochs, first.max_batches,
                      round_points(spec, {claim.name: rounds.max for claim in spec.report.claims}))
    return (f"seed rounds: this plan is round 1 ({rounds.start} seeds per cell); each later round adds "
            f"seeds to the cells of the claims still undecided, up to {rounds.max} (looks at "
            f"{', '.join(map(str, rounds.looks()))} seeds): at most {len(most.stages) - len(first.stages)} more "
            f"stages, {most.epochs() - first.epochs()} more epochs")
