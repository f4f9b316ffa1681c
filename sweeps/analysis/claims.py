"""Verdicts on the claims a spec declares (`report.claims`): each claim is a contrast of grid
cells (treated minus control, optionally its difference between two values of a second axis),
tested with Welch's t-test over the seeds of each cell, and set beside the paper's effect.

A verdict is `holds` (p < 0.05 with the paper's sign), `contradicted` (p < 0.05 against it)
or `not shown at this scale` (anything else, including cells with fewer than two runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from bnew_core.config import BnewError
from sweeps.analysis.statistics import SIGNIFICANCE_LEVEL, welch_contrast
from sweeps.core.spec import ClaimSpec, PaperEffect

HOLDS, NOT_SHOWN, CONTRADICTED = "holds", "not shown at this scale", "contradicted"


@dataclass
class CellSample:
    """One compared cell: its axis values, its weight in the contrast (+1 or -1), its values."""

    selector: dict[str, str]
    coefficient: int
    values: np.ndarray
    label: str = ""
    """The cell's contrast and versus values (`ablation=no_prelu`); its `where` values are the claim's."""


@dataclass
class ClaimResult:
    claim: ClaimSpec
    cells: list[CellSample]
    effect: float
    se: float
    """Standard error of the effect (the sd of its estimate)."""
    df: float
    """Welch-Satterthwaite degrees of freedom."""
    p_value: float
    paper_effect: float
    verdict: str
    reason: str

    def ci95(self) -> tuple[float, float]:
        if math.isnan(self.se) or math.isnan(self.df):
            return math.nan, math.nan
        half = stats.t.ppf(0.975, self.df) * self.se
        return self.effect - half, self.effect + half


def tag_value(axis: str, value: Any) -> str:
    """A spec value as trial tags spell it (distillation `yes`/`no`, numbers as text)."""
    if axis == "distillation" and isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def where_text(claim: ClaimSpec) -> str:
    return ", ".join(f"{axis}={tag_value(axis, value)}" for axis, value in claim.where.items())


def claim_cells(claim: ClaimSpec) -> list[tuple[dict[str, str], int]]:
    """The compared cells as tag selectors (contrast and versus axes first) with their contrast
    coefficients."""
    (axis, (treated, control)), = claim.contrast.items()
    where = {key: tag_value(key, value) for key, value in claim.where.items()}
    sides = [({axis: tag_value(axis, treated)}, 1), ({axis: tag_value(axis, control)}, -1)]
    if not claim.versus:
        return [({**side, **where}, sign) for side, sign in sides]
    (versus_axis, (first, second)), = claim.versus.items()
    return [
        ({**side, versus_axis: tag_value(versus_axis, value), **where}, sign * versus_sign)
        for value, versus_sign in ((first, 1), (second, -1))
        for side, sign in sides
    ]


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


def verdict(cells: list[CellSample], effect: float, p_value: float, expected: float) -> tuple[str, str]:
    """The verdict and why."""
    if any(len(cell.values) < 2 for cell in cells):
        return NOT_SHOWN, "fewer than two runs in a cell"
    if math.isnan(p_value):
        return NOT_SHOWN, "no spread between seeds to test"
    if p_value >= SIGNIFICANCE_LEVEL:
        return NOT_SHOWN, f"p >= {SIGNIFICANCE_LEVEL}"
    if math.copysign(1, effect) == math.copysign(1, expected):
        return HOLDS, f"p < {SIGNIFICANCE_LEVEL}, the paper's sign"
    return CONTRADICTED, f"p < {SIGNIFICANCE_LEVEL}, against the paper's sign"


def evaluate_claims(results: pd.DataFrame, claims: list[ClaimSpec], paper: dict[str, Any]) -> list[ClaimResult]:
    """`results`: one row per finished result run (a re-run replaced), a column per axis named
    after it, holding the tag text, and `value` (the reported metric)."""
    evaluated = []
    for claim in claims:
        cells = []
        for selector, coefficient in claim_cells(claim):
            mask = np.ones(len(results), dtype=bool)
            for axis, value in selector.items():
                mask &= (results[axis] == value).to_numpy() if axis in results else False
            label = ", ".join(f"{axis}={value}" for axis, value in selector.items() if axis not in claim.where)
            cells.append(CellSample(selector, coefficient, results.loc[mask, "value"].dropna().to_numpy(), label))
        test = welch_contrast([cell.coefficient for cell in cells], [cell.values for cell in cells])
        effect, se, df, p_value = test.effect, test.se, test.df, test.p_value
        expected = paper_effect(claim, paper)
        outcome, reason = verdict(cells, effect, p_value, expected)
        evaluated.append(ClaimResult(claim, cells, effect, se, df, p_value, expected, outcome, reason))
    return evaluated


def number(value: float, digits: int = 2, signed: bool = True) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render_claims_markdown(results: list[ClaimResult], metric_note: str) -> str:
    """The verdicts as a Markdown section: one line per claim, then what the numbers mean."""
    lines = [
        "## Claims",
        "",
        "| claim | in cells with | effect ± s.e. (points) | 95% CI | p | paper (CIFAR-100) | verdict | cells: mean (n) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        low, high = result.ci95()
        cells = "; ".join(
            f"{'+' if cell.coefficient > 0 else '−'}{cell.label}: "
            f"{number(float(np.mean(cell.values)), signed=False) if len(cell.values) else '—'} (n={len(cell.values)})"
            for cell in result.cells
        )
        effect = number(result.effect) + (f" ± {result.se:.2f}" if not math.isnan(result.se) else "")
        p_text = "—" if math.isnan(result.p_value) else f"{result.p_value:.3g}"
        lines.append(
            f"| {result.claim.name} | {where_text(result.claim)} | {effect} | [{number(low)}, {number(high)}] | {p_text} | "
            f"{number(result.paper_effect, 1)} | **{result.verdict}** ({result.reason}) | {cells} |"
        )
    lines += [
        "",
        f"Effect: the contrast of the cells' means ({metric_note}), in accuracy points; ± is its "
        "standard error (the sd of the estimate), the CI and p come from Welch's t-test with "
        "Welch-Satterthwaite degrees of freedom, one value per seed. A claim with `versus` is the "
        "difference of the contrast between the two versus values. Verdict: holds = p < "
        f"{SIGNIFICANCE_LEVEL} with the paper's sign; contradicted = p < {SIGNIFICANCE_LEVEL} against "
        "it; not shown at this scale = otherwise. The paper's effects are on CIFAR-100 at 200/1000 "
        "epochs; compare signs and rough sizes, not values.",
        "",
    ]
    return "\n".join(lines)


def claims_frame(results: list[ClaimResult]) -> pd.DataFrame:
    """One row per claim (the CSV of the verdicts)."""
    return pd.DataFrame(
        [
            {
                "claim": result.claim.name, "where": where_text(result.claim), "effect": result.effect,
                "se": result.se, "df": result.df,
                "ci_low": result.ci95()[0], "ci_high": result.ci95()[1], "p_value": result.p_value,
                "paper_effect": result.paper_effect, "verdict": result.verdict, "reason": result.reason,
                "cells": "; ".join(f"{cell.coefficient:+d} {cell.label} n={len(cell.values)}" for cell in result.cells),
            }
            for result in results
        ]
    )

