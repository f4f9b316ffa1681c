"""The claim statistics against independent oracles: scipy's t-tests, statsmodels' multipletests
and power classes, scipy's multivariate normal, and fixed-seed simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

from sweeps.analysis.sequential import (
    SequentialDesign,
    rejection_rate,
    simulate_false_positive_rate,
    spent_alpha,
)
from sweeps.core.spec import SeedRounds
from sweeps.analysis.statistics import (
    SIGNIFICANCE_LEVEL,
    _noncentral_t_sf,
    adjust_p_values,
    contrast_power,
    contrast_test,
    minimum_detectable_effect,
    paired_contrast,
    seeds_needed,
    welch_contrast,
)

ALPHA = SIGNIFICANCE_LEVEL
TREATED = [71.2, 70.4, 72.9, 71.8, 70.1]
CONTROL = [69.8, 70.9, 70.2, 69.1, 70.0, 68.7]


def by_seed(values: list[float], seeds: list[int] | None = None) -> dict[int, float]:
    return dict(zip(seeds if seeds is not None else range(len(values)), values))


# --- Welch -------------------------------------------------------------------------------------

def test_welch_two_cells_is_scipys_welch_test() -> None:
    result = welch_contrast([1, -1], [TREATED, CONTROL])
    oracle = stats.ttest_ind(TREATED, CONTROL, equal_var=False)
    assert result.test == "welch"
    assert result.effect == pytest.approx(np.mean(TREATED) - np.mean(CONTROL), rel=1e-12)
    assert result.effect / result.se == pytest.approx(oracle.statistic, rel=1e-12)
    assert result.df == pytest.approx(oracle.df, rel=1e-12)
    assert result.p_value == pytest.approx(oracle.pvalue, rel=1e-10)
    assert result.ci95() == pytest.approx(tuple(oracle.confidence_interval(0.95)), rel=1e-10)
    assert result.cell_sizes == (5, 6) and result.n == 5


def test_welch_four_cell_interaction_by_hand() -> None:
    rng = np.random.default_rng(3)
    cells = [rng.normal(70, 1 + i / 3, size=4 + i) for i in range(4)]
    result = welch_contrast([1, -1, -1, 1], cells)
    parts = [c.var(ddof=1) / len(c) for c in cells]
    variance = sum(parts)
    df = variance**2 / sum(p**2 / (len(c) - 1) for p, c in zip(parts, cells))
    effect = cells[0].mean() - cells[1].mean() - cells[2].mean() + cells[3].mean()
    assert result.effect == pytest.approx(effect, rel=1e-12)
    assert result.se == pytest.approx(math.sqrt(variance), rel=1e-12)
    assert result.df == pytest.approx(df, rel=1e-12)
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(effect) / math.sqrt(variance), df), rel=1e-10)


def test_welch_nan_rules() -> None:
    empty = welch_contrast([1, -1], [[], CONTROL])
    assert all(math.isnan(v) for v in (empty.effect, empty.se, empty.df, empty.p_value))
    single = welch_contrast([1, -1], [[71.0], CONTROL])
    assert single.effect == pytest.approx(71.0 - np.mean(CONTROL))
    assert all(math.isnan(v) for v in (single.se, single.df, single.p_value))
    flat = welch_contrast([1, -1], [[71.0, 71.0], [70.0, 70.0, 70.0]])
    assert (flat.effect, flat.se) == (pytest.approx(1.0), 0.0) and math.isnan(flat.p_value)
    with_nan = welch_contrast([1, -1], [TREATED + [math.nan], CONTROL])
    assert with_nan.p_value == welch_contrast([1, -1], [TREATED, CONTROL]).p_value
    with pytest.raises(ValueError):
        welch_contrast([1, -1, 1], [TREATED, CONTROL])


# --- paired ------------------------------------------------------------------------------------

def test_paired_two_cells_is_scipys_paired_test() -> None:
    treated, control = TREATED, CONTROL[:5]
    result = paired_contrast([1, -1], [by_seed(treated), by_seed(control)])
    rel, one = stats.ttest_rel(treated, control), stats.ttest_1samp(np.subtract(treated, control), 0.0)
    assert result.test == "paired" and result.n == 5 and result.df == 4
    assert result.p_value == pytest.approx(rel.pvalue, rel=1e-10) == one.pvalue
    assert result.effect / result.se == pytest.approx(rel.statistic, rel=1e-12)
    assert result.ci95() == pytest.approx(tuple(one.confidence_interval(0.95)), rel=1e-10)
    assert result.seed_contrasts == pytest.approx(by_seed(list(np.subtract(treated, control))))


def test_paired_four_cells_matches_per_seed_one_sample_test_and_ignores_key_order() -> None:
    rng = np.random.default_rng(5)
    seeds = [11, 12, 13, 14, 15, 16]
    shared = rng.normal(0, 2, size=6)  # the seed's own luck, common to its cells
    cells = [shared + rng.normal(mu, 0.3, size=6) for mu in (71.0, 70.0, 70.5, 70.2)]
    samples = [by_seed(list(c), seeds) for c in cells]
    samples[2] = dict(reversed(list(samples[2].items())))
    result = paired_contrast([1, -1, -1, 1], samples)
    d = cells[0] - cells[1] - cells[2] + cells[3]
    oracle = stats.ttest_1samp(d, 0.0)
    assert result.effect == pytest.approx(d.mean(), rel=1e-12)
    assert result.p_value == pytest.approx(oracle.pvalue, rel=1e-10)
    # the shared luck cancels in the paired test but not in Welch's
    assert result.p_value < welch_contrast([1, -1, -1, 1], cells).p_value


def test_paired_uses_only_seeds_in_every_cell_and_nan_rules() -> None:
    treated = {1: 71.0, 2: 72.0, 3: 70.5, 4: 73.0}
    control = {2: 70.0, 3: 70.1, 4: 71.2, 5: 69.0}
    result = paired_contrast([1, -1], [treated, control])
    assert result.n == 3 and set(result.seed_contrasts) == {2, 3, 4}
    assert result.p_value == pytest.approx(stats.ttest_rel([72.0, 70.5, 73.0], [70.0, 70.1, 71.2]).pvalue, rel=1e-10)
    none = paired_contrast([1, -1], [{1: 1.0}, {2: 1.0}])
    assert math.isnan(none.effect) and math.isnan(none.p_value)
    one = paired_contrast([1, -1], [{1: 3.0, 2: 1.0}, {1: 1.0}])
    assert one.effect == 2.0 and math.isnan(one.se)
    flat = paired_contrast([1, -1], [{1: 3.0, 2: 4.0}, {1: 1.0, 2: 2.0}])
    assert (flat.effect, flat.se) == (2.0, 0.0) and math.isnan(flat.p_value)


def test_contrast_test_chooses_from_the_design() -> None:
    same = contrast_test([1, -1], [by_seed(TREATED), by_seed(CONTROL[:5])])
    assert same.test == "paired" and same.reason == "paired by seed, 5 seeds in every cell"
    partly = contrast_test([1, -1], [by_seed(TREATED), by_seed(CONTROL)])  # control has seed 5 alone
    assert partly.test == "paired" and partly.n == 5 and "1 value without a partner left out" in partly.reason
    apart = contrast_test([1, -1], [by_seed(TREATED, [0, 1, 2, 3, 4]), by_seed(CONTROL, [4, 5, 6, 7, 8, 9])])
    assert apart.test == "welch" and apart.reason == "Welch, the cells share 1 seed"
    assert apart.p_value == welch_contrast([1, -1], [TREATED, CONTROL]).p_value


# --- multiplicity ------------------------------------------------------------------------------

P_VALUES = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, 0.212, 0.216]


@pytest.mark.parametrize("method, statsmodels_method", [("holm", "holm"), ("bh", "fdr_bh")])
def test_adjusted_p_values_are_multipletests(method: str, statsmodels_method: str) -> None:
    expected = multipletests(P_VALUES, method=statsmodels_method)[1]
    assert adjust_p_values(P_VALUES, method) == pytest.approx(expected, rel=1e-12)
    with_nan = [math.nan, *P_VALUES[:3], math.nan, *P_VALUES[3:]]
    adjusted = adjust_p_values(with_nan, method)
    assert np.isnan(adjusted[[0, 4]]).all()
    assert np.delete(adjusted, [0, 4]) == pytest.approx(expected, rel=1e-12)  # family of 10, not 12


def test_adjusted_p_values_known_values() -> None:
    assert adjust_p_values([0.01, 0.04, 0.03], "holm") == pytest.approx([0.03, 0.06, 0.06])
    assert adjust_p_values([0.01, 0.04, 0.03], "bh") == pytest.approx([0.03, 0.04, 0.04])
    assert adjust_p_values([0.01, math.nan], "none")[0] == 0.01
    assert np.isnan(adjust_p_values([math.nan, math.nan], "holm")).all()
    with pytest.raises(ValueError):
        adjust_p_values([0.01], "bonferroni")  # type: ignore[arg-type]


# --- power -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [3, 5, 8, 12])
def test_power_figures_are_statsmodels(n: int) -> None:
    sd = 0.7
    assert minimum_detectable_effect(sd, n, paired=True) == pytest.approx(
        sd * TTestPower().solve_power(effect_size=None, nobs=n, alpha=ALPHA, power=0.8), rel=1e-5)
    assert minimum_detectable_effect(sd, n, paired=False) == pytest.approx(
        sd * TTestIndPower().solve_power(effect_size=None, nobs1=n, alpha=ALPHA, power=0.8), rel=1e-5)
    assert contrast_power(0.9, sd, n, paired=True) == pytest.approx(TTestPower().power(0.9 / sd, n, ALPHA), rel=1e-10)
    welch = TTestIndPower().power(0.9 / sd, n, ALPHA)
    assert contrast_power(0.9, sd, n, paired=False) == pytest.approx(welch, rel=1e-10)
    # four cells of coefficient ±1: contrast variance 4 sd^2 / n, df 4 (n - 1), scipy's noncentral t
    effect = minimum_detectable_effect(sd, n, paired=False, cells=4)
    df, nc = 4 * (n - 1), effect / (sd * math.sqrt(4 / n))
    crit = stats.t.isf(ALPHA / 2, df)
    assert stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc) == pytest.approx(0.8, abs=1e-8)


def test_seeds_needed_is_the_first_n_reaching_the_power() -> None:
    for paired, cells, solver in [(True, 2, TTestPower()), (False, 2, TTestIndPower()), (False, 4, None)]:
        n = seeds_needed(0.8, 1.0, paired, cells=cells)
        reached = contrast_power(0.8, 1.0, n, paired, cells=cells)
        assert reached >= 0.8 > contrast_power(0.8, 1.0, n - 1, paired, cells=cells)
        if solver is not None:
            assert n == math.ceil(solver.solve_power(effect_size=0.8, alpha=ALPHA, power=0.8))
    assert seeds_needed(-0.8, 1.0, True) == seeds_needed(0.8, 1.0, True)
    with pytest.raises(ValueError):
        seeds_needed(0.0, 1.0, True)


def test_power_where_scipys_noncentral_t_gives_nan() -> None:
    crit = stats.t.isf(ALPHA / 2, 1)
    # P(T > crit) at df 1, nc -7.7, where scipy's nctdtr returns NaN: (Z - 7.7) / S > crit > 0
    # needs Z > 7.7, so it lies in [0, P(Z > 7.7)]
    assert 0 <= _noncentral_t_sf(crit, 1, -7.7) <= stats.norm.sf(7.7)
    for x, df, nc in [(2.0, 3, 1.5), (0.5, 1, -2.0), (12.7, 7, 6.0)]:
        assert _noncentral_t_sf(x, df, nc) == pytest.approx(stats.nct.sf(x, df, nc), abs=1e-12)
    powers = [contrast_power(e, 1.0, 2, paired=True) for e in np.linspace(5.0, 7.0, 21)]
    assert all(0 < a <= b <= 1 for a, b in zip(powers, powers[1:]))


def test_minimum_detectable_effect_really_has_its_power() -> None:
    rng = np.random.default_rng(2023)
    sims, n = 40_000, 5  # MC se of a rate near 0.8: 0.002
    effect = minimum_detectable_effect(1.0, n, paired=True)
    paired = stats.ttest_1samp(rng.standard_normal((sims, n)) + effect, 0.0, axis=1).pvalue
    assert (paired < ALPHA).mean() == pytest.approx(0.8, abs=0.01)
    effect = minimum_detectable_effect(1.0, n, paired=False)
    welch = stats.ttest_ind(rng.standard_normal((sims, n)) + effect, rng.standard_normal((sims, n)),
                            axis=1, equal_var=False).pvalue
    assert 0.75 < (welch < ALPHA).mean() <= 0.8  # Welch estimates its df: a little under plan


# --- sequential --------------------------------------------------------------------------------

LOOKS = SeedRounds(start=3, step=2, max=12).looks()
FPR_SIMS = 20_000
FPR_LIMIT = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / FPR_SIMS)


def test_seed_looks() -> None:
    assert LOOKS == [3, 5, 7, 9, 11, 12]
    assert SeedRounds(start=4, step=4, max=12).looks() == [4, 8, 12]
    assert SeedRounds(start=3, step=2, max=3, first=10).seeds(3) == [10, 11, 12]


@pytest.mark.parametrize("spending", ["pocock", "obrien_fleming"])
def test_z_boundaries_spend_alpha_under_the_joint_normal_law(spending: str) -> None:
    design = SequentialDesign(LOOKS, spending=spending, test="z")
    t = np.array(LOOKS) / LOOKS[-1]
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    c = np.array(design.z_bounds)
    for k in range(1, len(LOOKS) + 1):
        law = stats.multivariate_normal(np.zeros(k), cov[:k, :k], seed=k)  # Genz QMC, error ~1e-5
        crossed = 1 - law.cdf(c[:k], lower_limit=-c[:k])
        assert crossed == pytest.approx(spent_alpha(t[k - 1], ALPHA, spending), abs=2e-5)
    assert design.nominal_alphas == design.z_nominal_alphas


def test_pocock_boundaries_match_the_published_table() -> None:
    # Lan-DeMets Pocock-type, 5 equally spaced looks, two-sided 0.05: the tabulated boundaries
    bounds = SequentialDesign([2, 4, 6, 8, 10], spending="pocock", test="z").z_bounds
    assert bounds == pytest.approx([2.438, 2.427, 2.410, 2.397, 2.386], abs=1.5e-3)


def test_obrien_fleming_waits_and_pocock_spends_early() -> None:
    obf, pocock = SequentialDesign(LOOKS), SequentialDesign(LOOKS, spending="pocock")
    assert obf.nominal_alpha(0) < 1e-3 < pocock.nominal_alpha(0)
    assert obf.nominal_alpha(5) > pocock.nominal_alpha(5)
    assert all(a <= ALPHA for a in obf.nominal_alphas + pocock.nominal_alphas)
    assert pocock.decide(0, pocock.nominal_alpha(0) / 2) and not pocock.decide(0, pocock.nominal_alpha(0))
    assert not obf.decide(5, math.nan)


@pytest.mark.parametrize("spending", ["pocock", "obrien_fleming"])
@pytest.mark.parametrize("paired", [True, False])
def test_sequential_false_positive_rate_stays_at_alpha(spending: str, paired: bool) -> None:
    design = SequentialDesign(LOOKS, spending=spending, test="paired" if paired else "welch")
    rate = simulate_false_positive_rate(design, FPR_SIMS, np.random.default_rng(101), paired=paired)
    assert rate <= FPR_LIMIT


def test_naive_retesting_and_z_thresholds_on_t_inflate_false_positives() -> None:
    """The check can fail: testing at alpha at every look, and (less) the z design's thresholds
    applied to t-tests on 3, 5, 7 seeds, both exceed alpha."""
    naive = rejection_rate(LOOKS, [ALPHA] * len(LOOKS), FPR_SIMS, np.random.default_rng(102))
    assert naive > 2 * FPR_LIMIT
    sims = 100_000
    z_on_t = rejection_rate(LOOKS, SequentialDesign(LOOKS, spending="pocock", test="z").nominal_alphas, sims,
                            np.random.default_rng(103))
    assert z_on_t > ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / sims)


def test_sequential_design_keeps_most_of_the_fixed_design_power() -> None:
    effect = minimum_detectable_effect(1.0, LOOKS[-1], paired=True)  # 80% at 12 seeds, one look
    rng = np.random.default_rng(104)
    sequential = rejection_rate(LOOKS, SequentialDesign(LOOKS).nominal_alphas, FPR_SIMS, rng, effect=effect)
    assert 0.72 < sequential < 0.8


def test_design_validation() -> None:
    for looks in ([], [1, 3], [3, 3, 5], [5, 3]):
        with pytest.raises(ValueError):
            SequentialDesign(looks)
    with pytest.raises(ValueError):
        SequentialDesign(LOOKS, spending="haybittle")  # type: ignore[arg-type]
