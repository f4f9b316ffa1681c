"""Claims and tables against independent oracles: scipy's paired, one-sample and Welch t-tests,
statsmodels' multipletests and power classes. Frames are built in memory (no MLflow), so every
number comes from the report's own code path (evaluate_claims, build_table)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from sweeps.analysis.claims import (
    CONTRAST_CELL,
    HOLDS,
    NOT_SHOWN,
    POWER,
    claims_frame,
    claims_seeds_frame,
    evaluate_claims,
    render_claims_markdown,
)
from sweeps.analysis.statistics import SIGNIFICANCE_LEVEL
from sweeps.analysis.tables import build_table, cells_frame, render_markdown
from sweeps.core.spec import ClaimSpec, ReportSpec

ALPHA = SIGNIFICANCE_LEVEL
SEEDS = ["0", "1", "2", "3", "4"]
rng = np.random.default_rng(7)
SHARED = rng.normal(0, 2.0, size=len(SEEDS))  # what a seed's pretrained model adds to every cell
VALUES = {  # ablation -> one value per seed; cells of a seed move together, as in the sweeps
    "baseline": 55 + SHARED + rng.normal(0, 0.4, 5),
    "no_prelu": 54.2 + SHARED + rng.normal(0, 0.4, 5),
    "no_scale": 55.3 + SHARED + rng.normal(0, 0.4, 5),
    "binary_first_last": 50 + SHARED + rng.normal(0, 0.4, 5),
}
STE = {"baseline": 55.5 + SHARED + rng.normal(0, 0.4, 5), "no_prelu": 55.1 + SHARED + rng.normal(0, 0.4, 5)}


def frame(cells: dict[tuple[str, str], tuple[list[str], np.ndarray]]) -> pd.DataFrame:
    """A results frame as report.claim_results builds it: axis columns, seed and value."""
    return pd.DataFrame([{"optimiser": optimiser, "ablation": ablation, "seed": seed, "value": float(value)}
                         for (optimiser, ablation), (seeds, values) in cells.items()
                         for seed, value in zip(seeds, values)])


RESULTS = frame({**{("bnew", ablation): (SEEDS, values) for ablation, values in VALUES.items()},
                 **{("ste", ablation): (SEEDS, values) for ablation, values in STE.items()}})


def claim(name: str, treated: str, paper: float, **extra) -> ClaimSpec:
    return ClaimSpec(name=name, contrast={"ablation": [treated, "baseline"]}, where={"optimiser": "bnew"},
                     paper_effect=paper, **extra)


CLAIMS = [
    claim("first/last", "binary_first_last", -13.3),
    claim("prelu", "no_prelu", -1.3),
    claim("scale", "no_scale", -0.6),
    ClaimSpec(name="prelu matters more for bnew", contrast={"ablation": ["no_prelu", "baseline"]},
              versus={"optimiser": ["bnew", "ste"]}, paper_effect=-0.5),
]


def test_paired_claims_are_scipys_ttest_rel_and_ttest_1samp() -> None:
    first, prelu, _, versus = evaluate_claims(RESULTS, CLAIMS, {})
    oracle = stats.ttest_rel(VALUES["binary_first_last"], VALUES["baseline"])
    assert first.test.test == "paired" and first.test.reason == "paired by seed, 5 seeds in every cell"
    assert first.p_value == pytest.approx(oracle.pvalue, rel=1e-10)
    assert first.effect / first.se == pytest.approx(oracle.statistic, rel=1e-10)
    assert first.ci95() == pytest.approx(tuple(oracle.confidence_interval(0.95)), rel=1e-10)
    assert prelu.p_value == pytest.approx(stats.ttest_rel(VALUES["no_prelu"], VALUES["baseline"]).pvalue, rel=1e-10)
    within = VALUES["no_prelu"] - VALUES["baseline"] - (STE["no_prelu"] - STE["baseline"])
    assert versus.p_value == pytest.approx(stats.ttest_1samp(within, 0.0).pvalue, rel=1e-10)
    assert list(versus.seed_contrasts.values()) == pytest.approx(within.tolist(), rel=1e-12)
    # the paired test removes the shared seed effect that Welch's would keep as noise
    assert prelu.p_value < ALPHA < stats.ttest_ind(VALUES["no_prelu"], VALUES["baseline"], equal_var=False).pvalue


@pytest.mark.parametrize("correction, method", [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjusted_p_over_the_claims_is_statsmodels_multipletests(correction: str, method: str) -> None:
    untestable = claim("one run", "no_such_ablation", -1.0)  # an empty cell: no p, not in the family
    results = evaluate_claims(RESULTS, [*CLAIMS, untestable], {}, correction)
    raw = [stats.ttest_rel(VALUES[t], VALUES["baseline"]).pvalue for t in ("binary_first_last", "no_prelu", "no_scale")]
    raw.append(stats.ttest_1samp(VALUES["no_prelu"] - VALUES["baseline"] - STE["no_prelu"] + STE["baseline"], 0).pvalue)
    expected = multipletests(raw, alpha=ALPHA, method=method)[1]
    assert [r.adjusted_p for r in results[:4]] == pytest.approx(expected.tolist(), rel=1e-10)
    assert math.isnan(results[4].adjusted_p) and {r.family for r in results} == {4}
    for result in results[:4]:  # the verdict reads the adjusted p
        assert (result.verdict != NOT_SHOWN) == (result.adjusted_p < ALPHA)
    text = render_claims_markdown(results, "metric")
    assert "over the 4 claims tested" in text and f"report.correction: {correction}" in text
    none = evaluate_claims(RESULTS, CLAIMS, {}, "none")
    assert [r.adjusted_p for r in none] == pytest.approx(raw, rel=1e-10)


def test_significant_before_adjustment_only_is_not_shown() -> None:
    rows = frame({("bnew", "baseline"): (SEEDS, VALUES["baseline"]),
                  ("bnew", "no_prelu"): (SEEDS, VALUES["baseline"] - 0.5 + np.array([0.3, -0.2, 0.1, -0.3, 0.2]))})
    claims = [claim("prelu", "no_prelu", -1.3), claim("again", "no_prelu", -1.3), claim("twice", "no_prelu", -1.3)]
    raw = evaluate_claims(rows, claims, {}, "none")[0]
    assert raw.p_value < ALPHA and raw.verdict == HOLDS
    result = evaluate_claims(rows, claims * 4, {}, "holm")[0]  # 12 claims: Holm multiplies the p by 12
    assert result.adjusted_p >= ALPHA and result.verdict == NOT_SHOWN
    assert result.reason == f"p < {ALPHA} but adjusted p >= {ALPHA} (Holm over 12 claims)"


def test_power_columns_are_statsmodels_power_for_the_observed_sd() -> None:
    prelu, stated = evaluate_claims(RESULTS, [claim("prelu", "no_prelu", -1.3),
                                              claim("stated", "no_prelu", -1.3, smallest_effect=0.25)], {})
    within = VALUES["no_prelu"] - VALUES["baseline"]
    sd = np.std(within, ddof=1)
    assert prelu.power.sd == pytest.approx(sd, rel=1e-12) and prelu.power.n == 5
    d = TTestPower().solve_power(nobs=5, alpha=ALPHA, power=POWER, alternative="two-sided")
    assert prelu.power.mde == pytest.approx(d * sd, rel=1e-6)
    for result, target in ((prelu, 1.3), (stated, 0.25)):
        n = TTestPower().solve_power(effect_size=target / sd, alpha=ALPHA, power=POWER, alternative="two-sided")
        assert result.power.target == target and result.power.seeds == max(2, math.ceil(n))
    assert (prelu.power.target_from, stated.power.target_from) == ("paper", "smallest_effect")

    # Welch (the cells share no seed): the cells' pooled sd, TTestIndPower with n per cell
    treated, control = VALUES["no_prelu"], VALUES["baseline"][:4]
    rows = frame({("bnew", "no_prelu"): (["10", "11", "12", "13", "14"], treated),
                  ("bnew", "baseline"): (SEEDS[:4], control)})
    (welch,) = evaluate_claims(rows, [claim("prelu", "no_prelu", -4.0)], {})
    assert welch.test.test == "welch" and welch.test.reason == "Welch, the cells share no seed"
    assert welch.p_value == pytest.approx(stats.ttest_ind(treated, control, equal_var=False).pvalue, rel=1e-10)
    pooled = math.sqrt((4 * np.var(treated, ddof=1) + 3 * np.var(control, ddof=1)) / 7)
    assert welch.power.sd == pytest.approx(pooled, rel=1e-12) and welch.power.n == 4
    d = TTestIndPower().solve_power(nobs1=4, ratio=1, alpha=ALPHA, power=POWER, alternative="two-sided")
    assert welch.power.mde == pytest.approx(d * pooled, rel=1e-6)
    n = TTestIndPower().solve_power(effect_size=4.0 / pooled, ratio=1, alpha=ALPHA, power=POWER,
                                    alternative="two-sided")
    assert welch.power.seeds == max(2, math.ceil(n))
    assert claims_frame([welch]).loc[0, ["mde", "seeds_needed", "sd"]].tolist() == pytest.approx(
        [d * pooled, max(2, math.ceil(n)), pooled], rel=1e-6)


def test_undecided_when_the_ci_holds_zero_and_the_mde_is_above_the_effect_of_interest() -> None:
    scale, small = evaluate_claims(RESULTS, [claim("scale", "no_scale", -0.6),
                                             claim("small", "no_scale", -0.6, smallest_effect=0.05)], {})
    low, high = scale.ci95()
    assert low <= 0 <= high and scale.verdict == NOT_SHOWN
    assert scale.power.mde > 0.6  # the per-seed difference's sd is ~0.5 at 5 seeds
    assert scale.reason.startswith("undecided at n=5: its CI holds 0, and 80% power needs an effect of ")
    row = render_claims_markdown([scale], "metric").splitlines()[4]
    assert len(re.split(r"(?<!\\)\|", row)) == 14  # 12 columns: no unescaped | inside a cell
    assert f"{scale.power.seeds} seeds per cell would decide it" in scale.reason
    n = TTestPower().solve_power(effect_size=0.6 / scale.power.sd, alpha=ALPHA, power=POWER, alternative="two-sided")
    assert scale.power.seeds == math.ceil(n)
    assert small.reason.startswith("undecided at n=5") and f"{small.power.seeds} seeds per cell" in small.reason
    big = evaluate_claims(RESULTS, [claim("big", "no_scale", -0.6, smallest_effect=50.0)], {})[0]
    assert big.reason.startswith("adjusted p >= 0.05, though n=5 had 80% power")


def test_a_cell_with_several_runs_of_a_seed_gets_welch() -> None:
    rows = frame({("bnew", "baseline"): (SEEDS + SEEDS, np.r_[VALUES["baseline"], VALUES["baseline"] + 1]),
                  ("bnew", "no_prelu"): (SEEDS, VALUES["no_prelu"])})
    (result,) = evaluate_claims(rows, [claim("prelu", "no_prelu", -1.3)], {})
    assert result.test.test == "welch" and "holds several runs of one seed" in result.test.reason
    control = np.r_[VALUES["baseline"], VALUES["baseline"] + 1]
    assert result.p_value == pytest.approx(stats.ttest_ind(VALUES["no_prelu"], control, equal_var=False).pvalue)


def test_claims_seeds_csv_rebuilds_the_test() -> None:
    results = evaluate_claims(RESULTS, CLAIMS, {})
    seeds = claims_seeds_frame(results)
    first = seeds[seeds.claim == "first/last"]
    wide = first[first.cell != CONTRAST_CELL].pivot(index="seed", columns="cell", values="value")
    again = stats.ttest_rel(wide["ablation=binary_first_last"], wide["ablation=baseline"]).pvalue
    assert again == pytest.approx(results[0].p_value, rel=1e-10)
    contrast = first[first.cell == CONTRAST_CELL]
    assert contrast.coefficient.isna().all() and len(contrast) == 5
    assert stats.ttest_1samp(contrast.value, 0).pvalue == pytest.approx(results[0].p_value, rel=1e-10)
    assert (seeds[seeds.cell != CONTRAST_CELL].coefficient.abs() == 1).all()


# --------------------------------------------------------------------------- tables
def trials(cells: dict[tuple[str, str], tuple[list[str], np.ndarray]]) -> pd.DataFrame:
    """Result trials as build_table reads them (one finished run per cell and seed)."""
    rows = frame(cells)
    return rows.assign(stage="quantise", status="FINISHED", start_time=range(len(rows)),
                       run_id=[f"r{i}" for i in range(len(rows))], grid="g", dataset="cifar10")


def test_table_comparisons_pair_by_seed_when_the_cells_share_seeds(tmp_path) -> None:
    late_seeds = ["5", "6", "7", "8"]  # a cell whose runs share no seed with the reference
    table_trials = trials({("bnew", "baseline"): (SEEDS, VALUES["baseline"]),
                           ("bnew", "no_prelu"): (SEEDS, VALUES["no_prelu"]),
                           ("bnew", "binary_first_last"): (SEEDS[:4], VALUES["binary_first_last"][:4]),
                           ("bnew", "no_scale"): (late_seeds, VALUES["no_scale"][:4])})
    for correction, method in (("holm", "holm"), ("bh", "fdr_bh")):
        layout = ReportSpec(rows=["ablation"], columns=["optimiser"], baseline="baseline", correction=correction)
        table = build_table(table_trials, "g", "cifar10", layout, [], None, {})
        cells = table.cells.xs("bnew", level="column")
        paired = stats.ttest_rel(VALUES["no_prelu"], VALUES["baseline"]).pvalue
        dropped = stats.ttest_rel(VALUES["binary_first_last"][:4], VALUES["baseline"][:4]).pvalue
        welch = stats.ttest_ind(VALUES["no_scale"][:4], VALUES["baseline"], equal_var=False).pvalue
        assert cells.loc["no_prelu", "test"] == "paired" and cells.loc["no_prelu", "p_value"] == pytest.approx(paired)
        assert cells.loc["binary_first_last", "p_value"] == pytest.approx(dropped)
        assert cells.loc["binary_first_last", "test_reason"] == (
            "paired by seed, 4 seeds in every cell (1 value without a partner left out)")
        assert cells.loc["no_scale", "test"] == "welch" and cells.loc["no_scale", "p_value"] == pytest.approx(welch)
        assert cells.loc["baseline", "test"] == "" and math.isnan(cells.loc["baseline", "p_adjusted"])
        order = ["binary_first_last", "no_prelu", "no_scale"]
        expected = multipletests([dropped, paired, welch], alpha=ALPHA, method=method)[1]
        assert cells.loc[order, "p_adjusted"].tolist() == pytest.approx(expected.tolist(), rel=1e-10)
        assert cells.loc[order, "significant"].tolist() == [bool(p < ALPHA) for p in expected]
        text = render_markdown(table)
        assert "over the 3 comparisons tested" in text and f"report.correction: {correction}" in text
        assert "Welch's (`Welch p`; 1 of 3 here); 1 paired test(s) left out runs" in text
        assert f"Welch p={welch:.3g}, adj. " in text and f" p={paired:.3g}, adj. " in text
    csv = cells_frame([table]).set_index("row")
    assert csv.loc["no_scale", "seed_values"] == " ".join(
        f"{seed}:{float(value)!r}" for seed, value in zip(late_seeds, VALUES["no_scale"][:4]))
    assert csv.loc["no_prelu", "correction"] == "bh"
    none = build_table(table_trials, "g", "cifar10", layout.model_copy(update={"correction": "none"}), [], None, {})
    assert "not adjusted for multiplicity (report.correction: none; 3 comparisons tested)" in render_markdown(none)
    assert none.cells.loc[("no_prelu", "bnew"), "p_adjusted"] == pytest.approx(paired)
