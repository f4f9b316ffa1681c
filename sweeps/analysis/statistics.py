"""The tests behind claim verdicts: contrasts of grid cells, paired by seed where the design
allows, multiplicity adjustment across a report's claims, and power (what a sweep of n seeds can
detect, and how many seeds an effect needs).

Cells that share a seed share the pretrained model and the batch order, so their values are
correlated; testing the per-seed contrast (paired) removes that shared noise, while Welch's test
on the cells' means ignores it (conservative when the correlation is positive, as it is here).

Only numpy, scipy, statsmodels and the standard library: this module is the bottom of the
analysis layer and knows nothing about specs, runs or reports.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from scipy import integrate, optimize, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

SIGNIFICANCE_LEVEL = 0.05
"""The one significance level of the sweep's verdicts (two-sided)."""

TestName = Literal["paired", "welch"]
AdjustMethod = Literal["holm", "bh", "none"]
MIN_PAIRED_SEEDS = 2
"""Seeds every cell must share for the paired test (a per-seed contrast needs 2 values for a sd)."""


@dataclass(frozen=True)
class ContrastTest:
    """A tested contrast sum(c_i * cell_i). NaN fields mean "cannot be computed" (see the test
    functions for when); `effect` alone is set when every cell has a value but no spread can be
    estimated."""

    test: TestName
    effect: float
    se: float
    """Standard error of `effect` (the sd of the estimate, not of the seeds)."""
    df: float
    """n - 1 for paired; Welch-Satterthwaite for welch."""
    p_value: float
    """Two-sided."""
    n: int
    """Paired: the seeds used (those every cell has). Welch: the smallest cell's size."""
    cell_sizes: tuple[int, ...]
    """Values used per cell (paired: n each)."""
    reason: str = ""
    """Why this test was chosen, for the report (set by `contrast_test`)."""
    seed_contrasts: dict[Hashable, float] | None = field(default=None, compare=False)
    """Paired only: the contrast computed within each seed, the sample the t-test is on."""

    def ci(self, level: float = 0.95) -> tuple[float, float]:
        """The t interval effect ± t_{df} * se (NaN when se or df is)."""
        if math.isnan(self.se) or math.isnan(self.df):
            return math.nan, math.nan
        half = float(stats.t.ppf(0.5 + level / 2, self.df)) * self.se
        return self.effect - half, self.effect + half

    def ci95(self) -> tuple[float, float]:
        return self.ci(0.95)


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    return array[~np.isnan(array)]


def _check_coefficients(coefficients: Sequence[float], cells: int) -> np.ndarray:
    weights = np.asarray(coefficients, dtype=float)
    if weights.shape != (cells,) or cells == 0:
        raise ValueError(f"{len(weights)} coefficients for {cells} cells")
    return weights


def welch_contrast(coefficients: Sequence[float], samples: Sequence[Sequence[float] | np.ndarray]) -> ContrastTest:
    """Welch's test of sum(c_i * mean_i) over independent cells: se^2 = sum c_i^2 s_i^2 / n_i,
    Welch-Satterthwaite df, two-sided t p-value. NaN values are dropped. Any empty cell: all NaN;
    any cell with one value: the effect only; no spread in any cell: se 0, df and p NaN (a t-test
    of a zero-variance sample says nothing). With cells (+1, -1) this is scipy's
    `ttest_ind(equal_var=False)`."""
    weights = _check_coefficients(coefficients, len(samples))
    cells = [_clean(sample) for sample in samples]
    sizes = tuple(len(cell) for cell in cells)
    nan = math.nan
    if min(sizes) == 0:
        return ContrastTest("welch", nan, nan, nan, nan, min(sizes), sizes)
    effect = float(sum(w * cell.mean() for w, cell in zip(weights, cells)))
    if min(sizes) < 2:
        return ContrastTest("welch", effect, nan, nan, nan, min(sizes), sizes)
    parts = np.array([w**2 * cell.var(ddof=1) / len(cell) for w, cell in zip(weights, cells)])
    variance = float(parts.sum())
    if variance == 0:
        return ContrastTest("welch", effect, 0.0, nan, nan, min(sizes), sizes)
    df = variance**2 / float(sum(part**2 / (size - 1) for part, size in zip(parts, sizes)))
    se = math.sqrt(variance)
    p_value = float(2 * stats.t.sf(abs(effect) / se, df))
    return ContrastTest("welch", effect, se, df, p_value, min(sizes), sizes)


def shared_seeds(samples_by_seed: Sequence[Mapping[Hashable, float]]) -> list[Hashable]:
    """The seeds with a (non-NaN) value in every cell, in the first cell's order."""
    present = [{seed for seed, value in cell.items() if not _is_nan(value)} for cell in samples_by_seed]
    common = set.intersection(*present) if present else set()
    return [seed for seed in samples_by_seed[0] if seed in common] if present else []


def _is_nan(value: float | None) -> bool:
    return value is None or math.isnan(float(value))


def paired_contrast(coefficients: Sequence[float], samples_by_seed: Sequence[Mapping[Hashable, float]]) -> ContrastTest:
    """The contrast computed within each seed that every cell has, d_s = sum c_i x_i[s], and a
    one-sample t-test of mean(d) = 0 (scipy's `ttest_1samp(d)`; `ttest_rel` for cells (+1, -1)).
    Seeds missing from any cell are left out. No shared seed: all NaN; one: the effect only; all
    d_s equal: se 0, df and p NaN."""
    weights = _check_coefficients(coefficients, len(samples_by_seed))
    seeds = shared_seeds(samples_by_seed)
    contrasts = {seed: float(sum(w * float(cell[seed]) for w, cell in zip(weights, samples_by_seed))) for seed in seeds}
    n = len(seeds)
    sizes = (n,) * len(samples_by_seed)
    nan = math.nan
    if n == 0:
        return ContrastTest("paired", nan, nan, nan, nan, 0, sizes, seed_contrasts=contrasts)
    values = np.fromiter(contrasts.values(), dtype=float, count=n)
    effect = float(values.mean())
    if n < 2:
        return ContrastTest("paired", effect, nan, nan, nan, n, sizes, seed_contrasts=contrasts)
    se = float(values.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return ContrastTest("paired", effect, 0.0, nan, nan, n, sizes, seed_contrasts=contrasts)
    df = float(n - 1)
    p_value = float(2 * stats.t.sf(abs(effect) / se, df))
    return ContrastTest("paired", effect, se, df, p_value, n, sizes, seed_contrasts=contrasts)


def contrast_test(coefficients: Sequence[float], samples_by_seed: Sequence[Mapping[Hashable, float]]) -> ContrastTest:
    """The test a claim gets, chosen from the design alone (never from which p is smaller):

    - paired on the seeds every cell has, when there are at least 2 of them. Values of seeds some
      cell lacks (a failed or unfinished run) are left out and counted in the reason: keeping the
      pairing is worth more than those few values, and Welch on paired data would ignore the
      shared-seed correlation;
    - Welch over all values otherwise (cells that share fewer than 2 seeds are not a paired design).
    """
    paired = paired_contrast(coefficients, samples_by_seed)
    if paired.n >= MIN_PAIRED_SEEDS:
        values = sum(sum(not _is_nan(v) for v in cell.values()) for cell in samples_by_seed)
        dropped = values - paired.n * len(samples_by_seed)
        reason = f"paired by seed, {paired.n} seeds in every cell"
        if dropped:
            reason += f" ({dropped} value{'s' if dropped != 1 else ''} without a partner left out)"
        return replace(paired, reason=reason)
    welch = welch_contrast(coefficients, [list(cell.values()) for cell in samples_by_seed])
    shared = "no seed" if paired.n == 0 else "1 seed"
    return replace(welch, reason=f"Welch, the cells share {shared}")


_METHODS = {"holm": "holm", "bh": "fdr_bh"}


def adjust_p_values(p_values: Sequence[float], method: AdjustMethod = "holm") -> np.ndarray:
    """Adjusted p-values for a report's family of claims (statsmodels' `multipletests`): "holm"
    controls the family-wise error rate, "bh" (Benjamini-Hochberg) the false discovery rate,
    "none" returns them unchanged. NaN entries (claims that could not be tested) stay NaN and are
    not counted in the family: an untestable claim cannot be a false positive."""
    p = np.asarray(p_values, dtype=float).copy()
    if method == "none":
        return p
    if method not in _METHODS:
        raise ValueError(f"unknown p-value adjustment {method!r}: holm, bh or none")
    tested = ~np.isnan(p)
    if tested.any():
        p[tested] = multipletests(p[tested], alpha=SIGNIFICANCE_LEVEL, method=_METHODS[method])[1]
    return p


def contrast_power(effect: float, sd: float, n: int | float, paired: bool, alpha: float = SIGNIFICANCE_LEVEL,
                   cells: int = 2) -> float:
    """Two-sided power of the claim's t-test for a true contrast `effect` with n seeds.

    sd, paired: the sd across seeds of the per-seed contrast d_s (`ContrastTest.seed_contrasts`);
    the test is a one-sample t on n values, df n - 1 (statsmodels' TTestPower). `cells` is unused:
    the contrast's coefficients are already inside d_s.

    sd, Welch: the sd of one cell's values across seeds, taken equal in every cell; with `cells`
    cells of coefficient ±1 and n values each, the contrast's variance is cells * sd^2 / n and
    df cells * (n - 1) (what Welch-Satterthwaite gives with equal variances), i.e. statsmodels'
    TTestIndPower with nobs1 = 2n / cells and that df (exactly its default for 2 cells). Realised
    Welch power is lower at small n, its df being estimated: simulated at the 80% MDE, 0.76 for 2
    cells of 4 seeds, 0.78 for 6 (plan a seed more).
    """
    if sd <= 0 or n < 2:
        raise ValueError(f"power needs sd > 0 and n >= 2, got sd={sd}, n={n}")
    # two-sided power = P(T > t_crit | d) + P(T > t_crit | -d), each as statsmodels' one-sided
    # power at alpha / 2 (the sum its two-sided branch computes); where scipy's nctdtr, under
    # statsmodels, returns NaN (far tails at large noncentrality, e.g. df 1, nc 7.7), the same
    # probability comes from `_noncentral_t_sf`
    if paired:
        df, nobs = n - 1, n

        def one_sided(d: float) -> float:
            return TTestPower().power(effect_size=d, nobs=n, alpha=alpha / 2, alternative="larger")
    else:
        df, nobs = cells * (n - 1), n / cells

        def one_sided(d: float) -> float:
            return TTestIndPower().power(effect_size=d, nobs1=2 * n / cells, alpha=alpha / 2, ratio=1, df=df,
                                         alternative="larger")
    total = 0.0
    for d in (abs(effect) / sd, -abs(effect) / sd):
        value = float(one_sided(d))
        if math.isnan(value):
            value = _noncentral_t_sf(float(stats.t.isf(alpha / 2, df)), df, d * math.sqrt(nobs))
        total += value
    return total


def _noncentral_t_sf(x: float, df: float, nc: float) -> float:
    """P(T > x) for T ~ noncentral t(df, nc) = (Z + nc) / S, S = sqrt(chi2_df / df): the exact
    integral E_S[Phi(nc - x S)] by quadrature, for the points where scipy's nctdtr gives NaN."""
    scale = math.sqrt(df)
    integrand = lambda s: stats.norm.cdf(nc - x * s) * stats.chi.pdf(s * scale, df) * scale  # noqa: E731
    return float(integrate.quad(integrand, 0, math.inf, epsabs=1e-13, limit=200)[0])


def minimum_detectable_effect(sd: float, n: int, paired: bool, alpha: float = SIGNIFICANCE_LEVEL,
                              power: float = 0.8, cells: int = 2) -> float:
    """The smallest |effect| the test detects with probability `power` at n seeds (same units as
    sd; see `contrast_power` for what sd means, paired or Welch). Solved on statsmodels' exact
    noncentral-t power, not a normal approximation."""
    target = power
    if not alpha < target < 1:
        raise ValueError(f"power {target} must lie in (alpha, 1)")
    low, high = 0.0, sd
    while contrast_power(high, sd, n, paired, alpha, cells) < target:
        high *= 2
    shortfall = lambda e: contrast_power(e, sd, n, paired, alpha, cells) - target  # noqa: E731
    return float(optimize.brentq(shortfall, low, high, xtol=1e-12 * sd))


def seeds_needed(effect: float, sd: float, paired: bool, alpha: float = SIGNIFICANCE_LEVEL, power: float = 0.8,
                 cells: int = 2, max_seeds: int = 100_000) -> int:
    """The fewest seeds (>= 2; per cell for Welch, every cell getting the same seeds) whose test
    has at least `power` against `effect` (see `contrast_power` for sd). Raises past `max_seeds` (a zero
    or tiny effect)."""
    target = power
    if effect == 0:
        raise ValueError("no number of seeds detects a zero effect")
    reaches = lambda n: contrast_power(abs(effect), sd, n, paired, alpha, cells) >= target  # noqa: E731
    low, high = 1, 2
    while not reaches(high):
        low, high = high, high * 2
        if low > max_seeds:
            raise ValueError(f"more than {max_seeds} seeds needed for effect {effect} at sd {sd}")
    while high - low > 1:  # power rises with n: the answer lies in (low, high]
        middle = (low + high) // 2
        low, high = (low, middle) if reaches(middle) else (middle, high)
    return high

