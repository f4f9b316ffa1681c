"""Rounds of adaptive seeds (`axes.seed: {start, step, max}`), judged claim by claim.

After each round every open claim is tested on the seeds its cells have run, against the
group-sequential boundary of that round (`sequential.SequentialDesign` over the planned rounds,
alpha split evenly between the report's claims: Bonferroni, which keeps the family-wise rate at
alpha whatever the claims' correlation, where Holm's step-down has no simple sequential form).
A claim is then
- `shown`: its p is below the round's boundary (the verdict reads the same boundary);
- `no effect of interest`: not shown, though its seeds had 80% power for the effect of interest
  (the MDE is at or below it): more seeds would chase a smaller effect than the claim cares for;
- `out of reach`: neither, and even `max` seeds would not give it that power (the observed spread
  needs more), so seeds spent on it would not decide it (unless `skip_out_of_reach: false`);
- `undecided`: otherwise; its cells get `step` more seeds next round (at `max`, it stays so).
Stopping a claim without rejecting never adds false positives, so the last three states may use
any rule; only `shown` must hold the boundary, and `tests/test_rounds.py` simulates that the
whole procedure keeps its false-positive rate at alpha under the null."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import pandas as pd

from sweeps.analysis.claims import ClaimResult, Threshold, evaluate_claims
from sweeps.analysis.sequential import SequentialDesign
from sweeps.analysis.statistics import SIGNIFICANCE_LEVEL
from sweeps.core.schema import ROUND_TAG_PREFIX
from sweeps.core.spec import SeedRounds, SweepSpec

SHOWN, NO_EFFECT, OUT_OF_REACH, UNDECIDED = "shown", "no effect of interest", "out of reach", "undecided"
SPENDING_NAMES = {"obrien_fleming": "O'Brien-Fleming", "pocock": "Pocock"}


@dataclass(frozen=True)
class ClaimLook:
    """One claim at one round."""

    claim: str
    seeds: int
    """Seeds per cell its cells had run."""
    p_value: float
    threshold: float
    """The round's boundary: shown at p below it."""
    mde: float
    target: float
    """The effect of interest."""
    seeds_needed: int | None
    state: str


@dataclass(frozen=True)
class Round:
    """What the sweep decided after one round (recorded on the parent run as `bnew.round.<number>`)."""

    number: int
    """1-based."""
    looks: tuple[ClaimLook, ...]

    @property
    def undecided(self) -> list[str]:
        return [look.claim for look in self.looks if look.state == UNDECIDED]

    def tag(self) -> tuple[str, str]:
        """The MLflow tag (key, JSON value) that records the round."""
        return f"{ROUND_TAG_PREFIX}{self.number}", json.dumps([asdict(look) for look in self.looks])

    @classmethod
    def from_tag(cls, key: str, value: str) -> "Round":
        return cls(int(key.removeprefix(ROUND_TAG_PREFIX)), tuple(ClaimLook(**look) for look in json.loads(value)))

    def line(self) -> str:
        """`round 2 (5 seeds): (b) undecided p=0.21; ...` for the console and the report."""
        most = max(look.seeds for look in self.looks)
        parts = [f"{short_name(look.claim)} {look.state} at {look.seeds} seeds (p={look.p_value:.3g}, "
                 f"boundary {look.threshold:.3g})" for look in self.looks]
        return f"round {self.number} (up to {most} seeds per cell): " + "; ".join(parts)


def short_name(claim: str) -> str:
    """A claim's name up to its first space when that is a label like `(a)`, else whole."""
    head = claim.split(" ", 1)[0]
    return head if head.startswith("(") and head.endswith(")") else claim


def recorded_rounds(tags: dict[str, str]) -> list[Round]:
    """The rounds recorded on a parent run, in order."""
    rounds = [Round.from_tag(key, value) for key, value in tags.items() if key.startswith(ROUND_TAG_PREFIX)]
    return sorted(rounds, key=lambda played: played.number)


def next_reach(rounds: SeedRounds, played: list[Round]) -> dict[str, int]:
    """The seeds each claim runs in the round after `played`: the round a running sweep is in, or
    for a sweep that stopped, its last (no claim undecided, or at max)."""
    looks = rounds.looks()
    reach = {}
    for look in played[-1].looks if played else ():
        index = look_index(rounds, look.seeds)
        reach[look.claim] = looks[index + 1] if look.state == UNDECIDED and index + 1 < len(looks) else look.seeds
    return reach


def claim_alpha(correction: str, claims: int) -> float:
    """Each claim's alpha: the level split between the claims unless `report.correction: none`."""
    return SIGNIFICANCE_LEVEL if correction == "none" else SIGNIFICANCE_LEVEL / max(claims, 1)


@lru_cache(maxsize=32)
def round_design(looks: tuple[int, ...], alpha: float, spending: str, test: str) -> SequentialDesign:
    """The group-sequential design of a claim over the planned rounds (its calibration costs a
    second or two, so it is built once per process)."""
    return SequentialDesign(list(looks), alpha=alpha, spending=spending, test=test)  # type: ignore[arg-type]


def look_index(rounds: SeedRounds, seeds: int) -> int:
    """The round a claim that ran `seeds` seeds is at: the last planned look not above them."""
    return max(index for index, look in enumerate(rounds.looks()) if look <= seeds)


def claim_state(p_value: float, mde: float, target: float, seeds_needed: int | None, index: int,
                rounds: SeedRounds, design: SequentialDesign) -> str:
    """A claim's state after round `index` (0-based) from its test's p, its MDE at the seeds it
    ran, its effect of interest and the seeds per cell that effect needs (None: past any number)."""
    if design.decide(index, p_value):
        return SHOWN
    if mde <= target:
        return NO_EFFECT
    beyond_max = seeds_needed is None or seeds_needed > rounds.max
    if rounds.skip_out_of_reach and beyond_max and index < len(rounds.looks()) - 1:
        return OUT_OF_REACH
    return UNDECIDED


def judge_round(frame: pd.DataFrame, spec: SweepSpec, reached: dict[str, int], paper: dict[str, Any],
                number: int) -> tuple[Round, list[ClaimResult]]:
    """Every claim of `spec` on the seeds it reached (`reached`: claim name -> seeds per cell), from
    `frame` (`claims.claim_frame`): its state and the results with the boundaries as thresholds."""
    rounds, layout = spec.axes.seed_rounds, spec.report
    if rounds is None or layout is None:
        raise ValueError(f"{spec.name}: no seed rounds or no report.claims to judge")
    seeds = {claim.name: rounds.seeds(reached[claim.name]) for claim in layout.claims}
    plain = evaluate_claims(frame, layout.claims, paper, "none", seeds=seeds)
    alpha = claim_alpha(layout.correction, len(layout.claims))
    looks, thresholds = [], {}
    for result in plain:
        n = reached[result.claim.name]
        index = look_index(rounds, n)
        design = round_design(tuple(rounds.looks()), alpha, rounds.spending,
                              "paired" if result.test.test == "paired" else "welch")
        threshold = design.nominal_alpha(index)
        power = result.power
        state = claim_state(result.p_value, power.mde, power.target, power.seeds, index, rounds, design)
        looks.append(ClaimLook(result.claim.name, n, result.p_value, threshold, power.mde, power.target,
                               power.seeds, state))
        thresholds[result.claim.name] = Threshold(threshold, boundary_text(rounds, index, alpha, len(plain),
                                                                           layout.correction))
    judged = evaluate_claims(frame, layout.claims, paper, layout.correction, thresholds, seeds)
    return Round(number, tuple(looks)), judged


def boundary_text(rounds: SeedRounds, index: int, alpha: float, claims: int, correction: str) -> str:
    split = "" if correction == "none" else f" = {SIGNIFICANCE_LEVEL}/{claims} claims (Bonferroni)"
    return (f"{SPENDING_NAMES[rounds.spending]} boundary of round {index + 1} of {len(rounds.looks())}, "
            f"alpha {alpha:.3g}{split}")


def rounds_text(played: list[Round], rounds: SeedRounds) -> str:
    """The report's "rounds" lines: the plan, each round, and why the sweep stopped."""
    if not played:
        return ""
    last = played[-1]
    why = ("every claim decided" if not last.undecided else
           f"at max ({rounds.max} seeds): {', '.join(map(short_name, last.undecided))} still undecided")
    lines = [f"Rounds: seeds {{start: {rounds.start}, step: {rounds.step}, max: {rounds.max}}} (looks at "
             f"{', '.join(map(str, rounds.looks()))} seeds), {SPENDING_NAMES[rounds.spending]} spending; "
             f"{len(played)} round{'s' if len(played) > 1 else ''} run, stopped: {why}.", ""]
    lines += [f"- {played_round.line()}" for played_round in played]
    return "\n".join(lines + [""])
