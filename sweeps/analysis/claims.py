"""Verdicts on the claims a spec declares (`report.claims`): each claim is a contrast of grid
cells (treated minus control, optionally its difference between two values of a second axis),
computed on one value per seed and cell and set beside the paper's effect.

The test follows the design (`statistics.contrast_test`): cells that share seeds share the
pretrained model and the batch order, so the contrast is computed within each seed and its mean
t-tested (paired); cells sharing fewer than 2 seeds get Welch's test. The claims of a report are
one family: their p-values are adjusted together (`report.correction`, Holm by default), and the
verdict reads the adjusted p. Each claim also states its power: the minimum detectable effect
(MDE) at its seeds, and the seeds per cell that would detect the effect of interest (the claim's
`smallest_effect`, else the paper's |effect|).

A verdict is `holds` (adjusted p < 0.05 with the paper's sign), `contradicted` (adjusted p < 0.05
against it) or `not shown at this scale` (anything else); the reason says which, and calls a
claim undecided when its CI holds 0 and its seeds could not have detected the effect of interest.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from bnew_core.config import BnewError
from sweeps.analysis.statistics import (
    SIGNIFICANCE_LEVEL,
    ContrastTest,
    adjust_p_values,
    contrast_test,
    minimum_detectable_effect,
    seeds_needed,
    welch_contrast,
)
from sweeps.analysis.tables import correction_text, natural_key, seed_values_text
from sweeps.core.schema import tag_value
from sweeps.core.spec import ClaimSpec, PaperEffect
from sweeps.records.sweep_runs import TRIAL_COLUMNS

HOLDS, NOT_SHOWN, CONTRADICTED = "holds", "not shown at this scale", "contradicted"
POWER = 0.8
"""The power at which the report states a claim's MDE and the seeds its effect of interest needs."""
MAX_SEEDS = 10_000
"""Past this many seeds per cell the report says only "more than" (a tiny effect of interest)."""
CONTRAST_CELL = "per-seed contrast"
"""`cell` of the rows of claims_seeds.csv that hold a paired claim's contrast within each seed."""


@dataclass
class CellSample:
    """One compared cell: its axis values, its weight in the contrast (+1 or -1), its values and
    the seed of each (tag text)."""

    selector: dict[str, str]
    coefficient: int
    values: np.ndarray
    seeds: tuple[str, ...] = ()
    label: str = ""
    """The cell's contrast and versus values (`ablation=no_prelu`); its `where` values are the claim's."""

    @property
    def by_seed(self) -> dict[str, float]:
        return dict(zip(self.seeds, self.values.tolist()))

    @property
    def repeats_a_seed(self) -> bool:
        """Several runs of one seed: an axis the claim does not fix varies inside the cell."""
        return len(set(self.seeds)) < len(self.seeds)


@dataclass(frozen=True)
class Power:
    """What the claim's test can detect at its seeds, from the observed spread."""

    sd: float
    """Paired: sd across seeds of the per-seed contrast. Welch: the cells' pooled sd."""
    n: int
    """Paired: the shared seeds. Welch: the smallest cell's runs."""
    mde: float
    """The |effect| detected with POWER at n (NaN without a spread)."""
    target: float
    """The effect of interest: the claim's `smallest_effect`, else the paper's |effect|."""
    target_from: str
    """`smallest_effect` or `paper`."""
    seeds: int | None
    """Seeds per cell that detect `target` with POWER (None: no spread, a zero target, or past MAX_SEEDS)."""


@dataclass
class ClaimResult:
    claim: ClaimSpec
    cells: list[CellSample]
    test: ContrastTest
    adjusted_p: float
    correction: str
    """report.correction: holm, bh or none; for a claim judged against a seed round's boundary,
    `sequential, bonferroni` (alpha split between the claims) or `sequential` (correction none)."""
    family: int
    """Claims with a p-value in the report: the family the adjustment is over."""
    paper_effect: float
    power: Power
    verdict: str
    reason: str
    seed_contrasts: dict[str, float] = field(default_factory=dict)
    """Paired: the contrast within each shared seed (what the t-test is on)."""
    threshold: float = SIGNIFICANCE_LEVEL
    """The level the verdict reads `adjusted_p` against, or a sequential boundary it reads the raw p
    against (`adjusted_p` is then NaN)."""

    @property
    def effect(self) -> float:
        return self.test.effect

    @property
    def se(self) -> float:
        """Standard error of the effect (the sd of its estimate)."""
        return self.test.se

    @property
    def df(self) -> float:
        return self.test.df

    @property
    def p_value(self) -> float:
        """The raw two-sided p; the verdict reads `adjusted_p`."""
        return self.test.p_value

    def ci95(self) -> tuple[float, float]:
        """The unadjusted 95% t interval of the effect."""
        return self.test.ci95()


def where_text(claim: ClaimSpec) -> str:
    return ", ".join(f"{axis}={tag_value(axis, value)}" for axis, value in claim.where.items())


def paper_effect(claim: ClaimSpec, paper: dict[str, Any]) -> float:
    """The claim's paper effect: its number, or its cells of tables.json added up."""
    if not isinstance(claim.paper_effect, PaperEffect):
        return float(claim.paper_effect)
    spec = claim.paper_effect
    rows = paper.get(spec.table, {}).get("rows")
    if rows is None:
        raise BnewError(f"report.claims {claim.name!r}: paper_effect.table {spec.table!r} is not in tables.json")

    def total(cells: list[tuple[str, str]]) -> float:
        values = []
        for row, column in cells:
            value = rows.get(row, {}).get(column)
            if value is None:
                raise BnewError(f"report.claims {claim.name!r}: tables.json {spec.table} has no value at [{row}, {column}]")
            values.append(value[0])
        return sum(values)

    return round(total(spec.plus) - total(spec.minus), 2)


def claim_test(cells: list[CellSample]) -> ContrastTest:
    """`contrast_test` on the cells' per-seed values. A cell holding several runs of one seed has
    no single partner per seed, so such a claim gets Welch's test over all its values."""
    coefficients = [cell.coefficient for cell in cells]
    repeated = next((cell.label for cell in cells if cell.repeats_a_seed), None)
    if repeated is not None:
        test = welch_contrast(coefficients, [cell.values for cell in cells])
        return replace(test, reason=f"Welch, {repeated} holds several runs of one seed")
    return contrast_test(coefficients, [cell.by_seed for cell in cells])


def observed_sd(test: ContrastTest, cells: list[CellSample]) -> float:
    """The spread the power is computed from: paired, the sd of the per-seed contrasts; Welch,
    the cells' pooled sd (`statistics.contrast_power` takes one sd for every cell). NaN when a
    cell (or the contrast) has fewer than 2 values."""
    if test.test == "paired":
        contrasts = list((test.seed_contrasts or {}).values())
        return float(np.std(contrasts, ddof=1)) if len(contrasts) > 1 else math.nan
    samples = [cell.values[~np.isnan(cell.values)] for cell in cells]
    if min(len(sample) for sample in samples) < 2:
        return math.nan
    squares = sum(float(np.sum((sample - sample.mean()) ** 2)) for sample in samples)
    return math.sqrt(squares / sum(len(sample) - 1 for sample in samples))


def claim_power(claim: ClaimSpec, test: ContrastTest, cells: list[CellSample], expected: float) -> Power:
    """The claim's MDE at its seeds and the seeds per cell its effect of interest needs, both at
    POWER and the significance level, from the observed sd."""
    target, source = (claim.smallest_effect, "smallest_effect") if claim.smallest_effect else (abs(expected), "paper")
    sd, paired = observed_sd(test, cells), test.test == "paired"
    if math.isnan(sd) or sd == 0 or test.n < 2:
        return Power(sd, test.n, math.nan, target, source, None)
    mde = minimum_detectable_effect(sd, test.n, paired, power=POWER, cells=len(cells))
    try:
        needed = seeds_needed(target, sd, paired, power=POWER, cells=len(cells), max_seeds=MAX_SEEDS)
    except ValueError:  # a zero target, or past MAX_SEEDS
        needed = None
    return Power(sd, test.n, mde, target, source, needed)


def seeds_text(power: Power) -> str:
    if not power.target:
        return "no number of seeds (the effect of interest is 0)"
    return f"{power.seeds} seeds per cell" if power.seeds else f"more than {MAX_SEEDS:,} seeds per cell"


def verdict(test: ContrastTest, adjusted_p: float, expected: float, power: Power,
            adjustment: str = "", threshold: Threshold | None = None) -> tuple[str, str]:
    """The verdict and why. `adjustment` names the multiplicity correction ('' when none): the
    verdict reads the adjusted p, the undecided rule the unadjusted CI and the MDE. With a
    `threshold` (a sequential boundary) pass the raw p as `adjusted_p`: it is judged against it."""
    alpha = threshold.p if threshold else SIGNIFICANCE_LEVEL
    p_name = "p" if threshold or not adjustment else "adjusted p"
    adjustment = threshold.text if threshold else adjustment
    if min(test.cell_sizes, default=0) < 2:
        return NOT_SHOWN, "fewer than two runs in a cell"
    if math.isnan(test.p_value):
        return NOT_SHOWN, "no spread between seeds to test"
    if adjusted_p < alpha:
        where = f"{p_name} < {alpha:.3g}" + (f" ({adjustment})" if adjustment else "")
        if math.copysign(1, test.effect) == math.copysign(1, expected):
            return HOLDS, f"{where}, the paper's sign"
        return CONTRADICTED, f"{where}, against the paper's sign"
    if test.p_value < alpha:
        return NOT_SHOWN, f"p < {alpha:.3g} but adjusted p >= {alpha:.3g} ({adjustment})"
    low, high = test.ci95()
    interest = f"the {power.target:.2f} of interest ({'stated' if power.target_from == 'smallest_effect' else 'paper'})"
    if low <= 0 <= high and power.mde > power.target:
        return NOT_SHOWN, (f"undecided at n={power.n}: its CI holds 0, and {POWER:.0%} power needs an effect of "
                           f"{power.mde:.2f} or more (the MDE), above {interest}; {seeds_text(power)} would decide it")
    return NOT_SHOWN, (f"{p_name} >= {alpha:.3g}, though n={power.n} had {POWER:.0%} power for effects of "
                       f"{power.mde:.2f} or more, within {interest}")


def claim_samples(results: pd.DataFrame, claim: ClaimSpec) -> list[CellSample]:
    """The claim's cells from `results` (one row per result run: axis columns, `seed`, `value`)."""
    cells = []
    for selector, coefficient in claim.cells():
        mask = np.ones(len(results), dtype=bool)
        for axis, value in selector.items():
            mask &= (results[axis] == value).to_numpy() if axis in results else False
        chosen = results.loc[mask, ["seed", "value"]].dropna(subset=["value"])
        pairs = sorted(zip(map(str, chosen.seed), chosen.value.astype(float)), key=lambda pair: natural_key(pair[0]))
        label = ", ".join(f"{axis}={value}" for axis, value in selector.items() if axis not in claim.where)
        cells.append(CellSample(selector, coefficient, np.array([value for _, value in pairs], dtype=float),
                                tuple(seed for seed, _ in pairs), label))
    return cells


def claim_frame(results: pd.DataFrame, claims: list[ClaimSpec]) -> pd.DataFrame:
    """What `evaluate_claims` reads from a sweep's result trials (`tables.result_trials`): one
    row per trained stage that finished (a re-run replaces its predecessor; roles sharing a
    stage, as capped budgets do, count once), a column per axis the claims name, `seed`, `value`."""
    finished = results[results.status == "FINISHED"]
    trained = finished.stage_key.where(finished.stage_key != "", finished.run_name)
    finished = finished.assign(trained=trained).sort_values("start_time").drop_duplicates("trained", keep="last")
    axes = sorted({axis for claim in claims for axis in claim.axes()})
    columns = finished.reindex(columns=[axis if axis in TRIAL_COLUMNS else f"param.{axis}" for axis in axes], fill_value="")
    frame = pd.DataFrame(columns.to_numpy(), columns=axes, index=finished.index)
    return frame.assign(seed=finished.seed, value=finished.value)


@dataclass(frozen=True)
class Threshold:
    """A claim's significance threshold when it is not the fixed level after `report.correction`:
    a group-sequential boundary at the round the claim stopped (`sweeps.analysis.rounds`)."""

    p: float
    """The verdict holds at raw p below this."""
    text: str
    """How it was set, for the verdict's reason."""


def evaluate_claims(results: pd.DataFrame, claims: list[ClaimSpec], paper: dict[str, Any],
                    correction: str = "holm", thresholds: dict[str, Threshold] | None = None,
                    seeds: dict[str, list[int]] | None = None) -> list[ClaimResult]:
    """`results`: one row per finished result run (a re-run replaced), a column per axis named
    after it, holding the tag text, `seed` and `value` (the reported metric). The claims' p-values
    are adjusted as one family by `correction`; a claim in `thresholds` is judged on its raw p
    against its threshold instead (it has no adjusted p), and a claim in `seeds` on
    the runs of those seeds only (the rounds of seeds it ran, though other claims' cells ran more)."""
    def runs_of(claim: ClaimSpec) -> pd.DataFrame:
        if seeds is None or claim.name not in seeds:
            return results
        return results[results.seed.astype(str).isin([str(seed) for seed in seeds[claim.name]])]

    samples = [claim_samples(runs_of(claim), claim) for claim in claims]
    tests = [claim_test(cells) for cells in samples]
    adjusted = adjust_p_values([test.p_value for test in tests], correction)
    family = sum(not math.isnan(test.p_value) for test in tests)
    adjustment = correction_text(correction, family, "claim", short=True)
    evaluated = []
    for claim, cells, test, adjusted_p in zip(claims, samples, tests, adjusted):
        expected = paper_effect(claim, paper)
        power = claim_power(claim, test, cells, expected)
        threshold = (thresholds or {}).get(claim.name)
        if threshold is None:
            outcome, reason = verdict(test, float(adjusted_p), expected, power, adjustment)
        else:  # judged on the raw p against the boundary: no adjusted p
            adjusted_p = math.nan
            outcome, reason = verdict(test, test.p_value, expected, power, threshold=threshold)
        used = correction if threshold is None else "sequential" + (", bonferroni" if correction != "none" else "")
        evaluated.append(ClaimResult(claim, cells, test, float(adjusted_p), used, family, expected, power,
                                     outcome, reason, dict(test.seed_contrasts or {}) if test.test == "paired" else {},
                                     threshold.p if threshold else SIGNIFICANCE_LEVEL))
    return evaluated


def md_cell(text: str) -> str:
    """Text in a Markdown table cell (a `|` would end it)."""
    return text.replace("|", "\\|")


def number(value: float, digits: int = 2, signed: bool = True) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def p_text(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.3g}"


def power_texts(result: ClaimResult) -> tuple[str, str]:
    """The MDE column (`2.31 (n=3)`) and the seeds column (`14 for 4.00 (paper)`)."""
    power = result.power
    mde = f"{number(power.mde, signed=False)} (n={power.n})"
    source = "stated" if power.target_from == "smallest_effect" else "paper"
    if math.isnan(power.mde) or not power.target:
        return mde, "—"
    return mde, f"{power.seeds or f'>{MAX_SEEDS:,}'} for {power.target:.2f} ({source})"


def adjusted_text(result: ClaimResult) -> str:
    """The adjusted p cell; a claim judged against a sequential boundary shows the boundary."""
    if result.threshold != SIGNIFICANCE_LEVEL:
        return f"— (boundary {result.threshold:.3g})"
    return p_text(result.adjusted_p)


def render_claims_markdown(results: list[ClaimResult], metric_note: str) -> str:
    """The verdicts as a Markdown section: one line per claim, then what the numbers mean."""
    lines = [
        "## Claims",
        "",
        "| claim | in cells with | effect ± s.e. (points) | 95% CI | p | adjusted p | paper (CIFAR-100) | "
        f"MDE at n ({POWER:.0%} power) | seeds per cell for the effect of interest | verdict | test | "
        "cells: mean (n) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        low, high = result.ci95()
        cells = "; ".join(
            f"{'+' if cell.coefficient > 0 else '−'}{cell.label}: "
            f"{number(float(np.mean(cell.values)), signed=False) if len(cell.values) else '—'} (n={len(cell.values)})"
            for cell in result.cells
        )
        effect = number(result.effect) + (f" ± {result.se:.2f}" if not math.isnan(result.se) else "")
        mde, seeds = power_texts(result)
        lines.append(
            f"| {md_cell(result.claim.name)} | {md_cell(where_text(result.claim))} | {effect} | "
            f"[{number(low)}, {number(high)}] | {p_text(result.p_value)} | {adjusted_text(result)} | "
            f"{number(result.paper_effect, 1)} | {mde} | {seeds} | **{result.verdict}** ({md_cell(result.reason)}) | "
            f"{result.test.reason or '—'} | {md_cell(cells)} |"
        )
    correction, family = (results[0].correction, results[0].family) if results else ("none", 0)
    if any(result.threshold != SIGNIFICANCE_LEVEL for result in results):
        judged = ("Seed rounds: each claim is judged on the seeds of the round it stopped at (the other "
                  "claims' cells may have run more), its raw p against the group-sequential boundary of that "
                  "round, which the adjusted p column and the verdict give (alpha spent across the rounds and "
                  "split between the claims, so looking after every round keeps the chance of any false "
                  "verdict at 0.05; see Rounds below). Verdict: holds = p below the boundary with the paper's "
                  "sign; contradicted = below it against the paper's sign;")
    else:
        judged = (f"adjusted p: {correction_text(correction, family, 'claim')}. Verdict: holds = adjusted p < "
                  f"{SIGNIFICANCE_LEVEL} with the paper's sign; contradicted = adjusted p < {SIGNIFICANCE_LEVEL} "
                  "against it;")
    lines += [
        "",
        f"Effect: the contrast of the cells' means ({metric_note}), in accuracy points, one value per "
        "seed and cell; ± is its standard error (the sd of the estimate). Test: where the cells share "
        "at least 2 seeds (same pretrained model and batch order), the contrast is taken within each "
        "seed and its mean t-tested (paired, df = seeds - 1); seeds some cell lacks are left out. "
        "Otherwise Welch's t-test with Welch-Satterthwaite degrees of freedom. A claim with `versus` is "
        "the difference of the contrast between the two versus values. The 95% CI and p are unadjusted; "
        f"{judged} not shown at this scale = otherwise, undecided when the CI holds 0 and the MDE is "
        f"above the effect of interest. MDE: the smallest |effect| the test detects with {POWER:.0%} power "
        f"at its n and unadjusted alpha {SIGNIFICANCE_LEVEL}, from the observed sd (of the per-seed "
        "contrast when paired, the cells' pooled sd for Welch); seeds per cell: how many would detect the "
        "effect of interest (the claim's `smallest_effect`, stated, else the paper's |effect|) with that "
        "power. The per-seed values are in claims.csv (`cell_values`, `seed_contrasts`) and "
        "claims_seeds.csv. The paper's effects are on CIFAR-100 at 200/1000 epochs; compare signs and "
        "rough sizes, not values.",
        "",
    ]
    return "\n".join(lines)


def claims_frame(results: list[ClaimResult]) -> pd.DataFrame:
    """One row per claim (claims.csv); the per-seed values are in `claims_seeds_frame`."""
    return pd.DataFrame(
        [
            {
                "claim": result.claim.name, "where": where_text(result.claim), "test": result.test.test,
                "test_reason": result.test.reason, "n": result.test.n, "effect": result.effect, "se": result.se,
                "df": result.df, "ci_low": result.ci95()[0], "ci_high": result.ci95()[1], "p_value": result.p_value,
                "p_adjusted": result.adjusted_p, "correction": result.correction, "family": result.family,
                "paper_effect": result.paper_effect, "sd": result.power.sd, "mde": result.power.mde,
                "effect_of_interest": result.power.target, "effect_of_interest_from": result.power.target_from,
                "seeds_needed": result.power.seeds, "threshold": result.threshold, "verdict": result.verdict,
                "reason": result.reason,
                "cells": "; ".join(f"{cell.coefficient:+d} {cell.label} n={len(cell.values)}" for cell in result.cells),
                "cell_values": "; ".join(f"{cell.coefficient:+d} {cell.label}: "
                                         f"{seed_values_text(cell.seeds, cell.values)}" for cell in result.cells),
                "seed_contrasts": seed_values_text(result.seed_contrasts, result.seed_contrasts.values()),
            }
            for result in results
        ]
    )


SEED_COLUMNS = ["claim", "cell", "coefficient", "seed", "value"]


def claims_seeds_frame(results: list[ClaimResult]) -> pd.DataFrame:
    """claims_seeds.csv, the values behind every claim in long form: one row per claim, cell and
    seed (`cell` its label, `coefficient` its weight), and for a paired claim one row per shared
    seed with `cell` = CONTRAST_CELL, no coefficient, and the contrast within that seed. Pivot a
    claim's rows on `cell` to re-run its test."""
    rows = []
    for result in results:
        rows += [(result.claim.name, cell.label, cell.coefficient, seed, value)
                 for cell in result.cells for seed, value in zip(cell.seeds, cell.values.tolist())]
        rows += [(result.claim.name, CONTRAST_CELL, None, seed, value) for seed, value in result.seed_contrasts.items()]
    return pd.DataFrame(rows, columns=SEED_COLUMNS).astype({"coefficient": "Int64"})


def wrapped_reason(result: ClaimResult, width: int = 70) -> str:
    """The verdict and its reason, wrapped for a figure's tick label."""
    return textwrap.fill(f"{result.verdict} ({result.reason})", width)
