"""A sweep with seed rounds (`axes.seed: {start, step, max}`), round by round: run the round's
plan, judge every claim on what it ran (`sweeps.analysis.rounds`), record the round on the
parent run, and give the next round `step` more seeds in the cells of the claims still undecided.

Each round is a plan of its own over the same stage keys, so a later round reuses the earlier
seeds' stages (and any another sweep trained) and trains only the new seeds'. Judging needs only
finished runs, so `resume` replays the rounds from the first: the finished rounds decide as they
did (each claim is judged on its own seeds only), and the round that was stopped continues."""

from __future__ import annotations

from typing import Callable

from mlflow import MlflowClient

from sweeps.analysis.claims import claim_frame
from sweeps.analysis.rounds import Round, judge_round, recorded_rounds, short_name
from sweeps.analysis.tables import load_paper_tables, result_trials
from sweeps.core.plan import Plan, build_plan
from sweeps.core.rounds import round_points
from sweeps.core.spec import SweepSpec
from sweeps.records.sweep_runs import load_sweep
from sweeps.run.outcome import SweepOutcome

RunPlan = Callable[[Plan, "str | None"], SweepOutcome]
"""Runs one round's plan (with the Tune experiment to restore first, if any)."""


def run_rounds(spec: SweepSpec, first: Plan, log: Callable[[str], None], run_plan: RunPlan,
               restore: str | None) -> SweepOutcome:
    """Run the rounds from `first` (the plan of the first round's seeds) until every claim is
    decided or the last round ran; stop after a round that did not finish (resume continues)."""
    rounds, layout = spec.axes.seed_rounds, spec.report
    assert rounds is not None and layout is not None  # the spec's validation requires both
    looks = rounds.looks()
    reached = {claim.name: looks[0] for claim in layout.claims}
    paper = load_paper_tables()
    total: SweepOutcome | None = None
    for number in range(1, len(looks) + 1):
        plan = first if number == 1 else build_plan(spec, spec.name, first.max_epochs, first.max_batches,
                                                     round_points(spec, reached))
        log(f"round {number} of at most {len(looks)}: {len(plan.stages)} stages, "
            f"{max(reached.values())} seeds per cell of {'every claim' if number == 1 else 'the undecided claims'}")
        # `resume`: the Tune experiment restored is the stopped round's; earlier rounds replay
        # from MLflow with nothing to train, so the first round with stages to train restores it
        outcome = run_plan(plan, None if total is not None and total.restored else restore)
        total = outcome if total is None else total.then(outcome)
        if not outcome.complete:
            return total
        sweep = load_sweep(spec.resolved_tracking_uri(), spec.name)
        judged, _ = judge_round(claim_frame(result_trials(sweep, layout)[0], layout.claims), spec, reached, paper,
                                number)
        stops = not judged.undecided or number == len(looks)
        record_round(sweep.tracker.client, outcome.parent_run_id, judged, stops)
        log(judged.line())
        if not judged.undecided:
            log(f"rounds: every claim decided after round {number}")
            break
        if number == len(looks):
            log(f"rounds: max ({rounds.max} seeds) reached; undecided: {', '.join(map(short_name, judged.undecided))}")
            break
        for name in judged.undecided:
            reached[name] = looks[number]
    assert total is not None
    return total


def record_round(client: MlflowClient, parent_run_id: str, judged: Round, stops: bool) -> None:
    """Tag the parent run with the round; when the sweep `stops` there, drop the tags of later
    rounds an earlier run of the sweep recorded (a spec changed since may stop sooner)."""
    client.set_tag(parent_run_id, *judged.tag())
    if stops:
        for stale in recorded_rounds(client.get_run(parent_run_id).data.tags):
            if stale.number > judged.number:
                client.delete_tag(parent_run_id, stale.tag()[0])
