"""Group-sequential testing for adaptive seeds: a sweep that adds seeds in rounds and tests its
claims after every round would, tested at alpha each time, find a false "holds" far more often
than alpha (five looks at 0.05 reject a true null about 14% of the time for z-tests). Here alpha
is spent across the planned looks with a Lan-DeMets spending function, so the chance of any
false rejection over all looks stays at alpha.

Boundaries are computed for the z statistics Z_k of the looks, which under the null are jointly
normal with Cov(Z_j, Z_k) = sqrt(t_j / t_k) (j <= k), t_k = n_k / N the information fraction
(seeds at look k over seeds at the last look). The boundary c_k solves
P(|Z_1| < c_1, ..., |Z_{k-1}| < c_{k-1}, |Z_k| >= c_k) = a(t_k) - a(t_{k-1}), integrated
numerically (the recursive method of Armitage, McPherson and Rowe 1969, on Gauss-Legendre nodes).
The spending functions are the two-sided ones of Lan and DeMets (1983) and Jennison and Turnbull
(2000, chapter 7); gsDesign's `sfLDOF` instead applies the O'Brien-Fleming one to each side at
alpha / 2, which is a little stricter at early looks (Pocock-type is the same either way).

Claims are tested with t statistics on few seeds (3 at the first look), not z, and mapping each
z boundary to its nominal p-value 2 (1 - Phi(c_k)) and testing the look's t p-value against it
(the "significance-level approach" of Jennison and Turnbull, 2000) is NOT enough at
these sizes: each look's marginal rate is right, but t statistics on 3, 5, 7 seeds are less
correlated across looks than the z's (their variance estimates differ), so more null paths cross
somewhere. Simulated for looks [3, 5, 7, 9, 11, 12] with paired t-tests, it gives about 0.057
(Pocock) and 0.055 (O'Brien-Fleming) for alpha 0.05 (400,000 simulated sweeps).

So the thresholds `decide` uses are spent on the t statistics themselves. Under the null the
paired t statistics at the looks have a joint law that depends on the look sizes alone (the
per-seed contrasts are iid normal with mean 0, and t is free of their scale), so it is simulated
once, with a fixed seed, and alpha is spent on it exactly as Lan-DeMets spend it on the z's: look
k's p threshold is the one at which the simulated share of paths first rejected at look k equals
a(t_k) - a(t_{k-1}) (look 1's is a(t_1) exactly: a p-value is uniform). The whole spend is shrunk
by two Monte Carlo standard errors, so the design's true rate is at or below alpha unless the
fixed simulation is off by more than 2 se. For Welch the law is simulated with equal variances
in the two cells (then also scale-free); `test="z"` uses the z thresholds unchanged, exact for
large samples. `simulate_false_positive_rate` checks a design on fresh simulations with scipy's
t-tests, an implementation independent of the calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from scipy import optimize, stats

from sweeps.analysis.statistics import SIGNIFICANCE_LEVEL

Spending = Literal["obrien_fleming", "pocock"]
_NODES = 200
"""Gauss-Legendre nodes over each look's continuation interval: boundaries agree with 1000
nodes to 1e-12, even for 19 looks or looks 1% apart."""
_GRID_Z = 9.0


def spent_alpha(t: float, alpha: float, spending: Spending) -> float:
    """Lan-DeMets spending: the two-sided alpha used up by information fraction t.
    O'Brien-Fleming type 2 (1 - Phi(z_{1-alpha/2} / sqrt t)) spends almost nothing early and keeps
    the last look near alpha; Pocock type alpha ln(1 + (e - 1) t) spends evenly, so early looks can
    stop sooner at the price of a stricter last look."""
    if t <= 0:
        return 0.0
    t = min(t, 1.0)
    if spending == "obrien_fleming":
        return float(2 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(t)))
    if spending == "pocock":
        return float(alpha * math.log(1 + (math.e - 1) * t))
    raise ValueError(f"unknown alpha spending {spending!r}: obrien_fleming or pocock")


def _boundaries(fractions: Sequence[float], increments: Sequence[float]) -> list[float]:
    """z boundaries c_k such that the null probability of first crossing at look k is
    increments[k]; S_k = Z_k sqrt(t_k) is Brownian motion in t, integrated on a grid of the
    continuation interval of each look."""
    bounds: list[float] = []
    nodes, weights = np.polynomial.legendre.leggauss(_NODES)
    density_at: np.ndarray | None = None  # sub-density of S_{k-1} on the continuation nodes
    points: np.ndarray | None = None
    weights_scaled: np.ndarray | None = None
    previous_t = 0.0
    for t, increment in zip(fractions, increments):
        step_sd = math.sqrt(t - previous_t)
        if density_at is None:  # the first look: S_1 ~ N(0, t_1), crossing is a normal tail

            def crossing(c: float) -> float:
                return float(2 * stats.norm.sf(c))
        else:
            mass = density_at * weights_scaled

            def crossing(c: float, mass: np.ndarray = mass, points: np.ndarray = points) -> float:
                edge = c * math.sqrt(t)
                tails = stats.norm.sf((edge - points) / step_sd) + stats.norm.cdf((-edge - points) / step_sd)
                return float(mass @ tails)

        c = math.inf if increment <= 0 else float(optimize.brentq(lambda x: crossing(x) - increment, 0.0, 40.0,
                                                                  xtol=1e-12))
        bounds.append(c)
        # the sub-density of S_k on its continuation interval, for the next look; past |Z| = 9
        # (mass 2e-19) the grid stops, so an unreachable boundary does not thin the nodes out
        half = min(c, _GRID_Z) * math.sqrt(t)
        new_points = nodes * half
        if density_at is None:
            new_density = stats.norm.pdf(new_points, scale=step_sd)
        else:
            kernel = stats.norm.pdf((new_points[:, None] - points[None, :]) / step_sd) / step_sd
            new_density = kernel @ (density_at * weights_scaled)
        points, density_at, weights_scaled = new_points, new_density, weights * half
        previous_t = t
    return bounds


def _null_p_values(looks: Sequence[int], paths: int, rng: np.random.Generator, paired: bool) -> np.ndarray:
    """(paths, looks) two-sided p-values of the look tests on null normal data, from running sums
    (the calibration's own arithmetic; the checks use scipy's tests instead)."""
    n = np.asarray(looks, dtype=float)
    index = np.asarray(looks) - 1

    def prefix_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = np.cumsum(x, axis=1)[:, index] / n
        variance = (np.cumsum(x * x, axis=1)[:, index] - n * mean**2) / (n - 1)
        return mean, np.maximum(variance, 0.0)

    if paired:
        mean, variance = prefix_moments(rng.standard_normal((paths, looks[-1])))
        return 2 * stats.t.sf(np.abs(mean) / np.sqrt(variance / n), n - 1)
    mean_a, var_a = prefix_moments(rng.standard_normal((paths, looks[-1])))
    mean_b, var_b = prefix_moments(rng.standard_normal((paths, looks[-1])))
    part_a, part_b = var_a / n, var_b / n
    df = (part_a + part_b) ** 2 / ((part_a**2 + part_b**2) / (n - 1))
    return 2 * stats.t.sf(np.abs(mean_a - mean_b) / np.sqrt(part_a + part_b), df)


def _spend_on_simulation(p_values: np.ndarray, spent: Sequence[float]) -> list[float]:
    """Per-look p thresholds under which the share of simulated null paths first rejected by look
    k is at most spent[k] (cumulative, so rounding never accumulates)."""
    paths = p_values.shape[0]
    alive = np.ones(paths, dtype=bool)
    thresholds: list[float] = []
    for k, cumulative in enumerate(spent):
        if k == 0:
            threshold = spent[0]
        else:
            room = math.floor(cumulative * paths) - int(paths - alive.sum())
            candidates = np.sort(p_values[alive, k])
            if room <= 0:
                threshold = 0.0
            elif room >= len(candidates):
                threshold = 1.0
            else:  # exactly `room` alive paths have p below the midpoint
                threshold = float((candidates[room - 1] + candidates[room]) / 2)
        thresholds.append(float(threshold))
        alive &= ~(p_values[:, k] < threshold)
    return thresholds


_CALIBRATION_SEED = 20_231_129


@lru_cache(maxsize=64)
def _t_thresholds(looks: tuple[int, ...], spent: tuple[float, ...], paired: bool, paths: int) -> tuple[float, ...]:
    rng = np.random.default_rng(_CALIBRATION_SEED)
    chunk = max(1_000, 4_000_000 // looks[-1])  # bounded memory for long schedules
    p_values = np.concatenate([_null_p_values(looks, min(chunk, paths - done), rng, paired)
                               for done in range(0, paths, chunk)])
    return tuple(_spend_on_simulation(p_values, spent))


@dataclass
class SequentialDesign:
    """Planned looks (seed counts, increasing; the last is the most seeds the sweep will run) and
    the per-look nominal two-sided p-value thresholds that spend `alpha` across them for the
    claim's test (`test`: "paired" by seed, "welch", or "z" for large samples). At each look test
    the claim as usual and call `decide`; stop adding seeds for it at the first True. A claim not
    rejected by the last look is not shown. The looks must be the ones actually taken: a sweep
    that looks elsewhere needs a design for those looks."""

    looks: list[int]
    alpha: float = SIGNIFICANCE_LEVEL
    spending: Spending = "obrien_fleming"
    test: Literal["paired", "welch", "z"] = "paired"
    calibration_paths: int = 200_000
    """Simulated null paths the t thresholds are spent on (MC se of the rate ~0.0005 at alpha 0.05)."""
    z_bounds: list[float] = field(init=False)
    """|Z| boundaries per look from the joint normal law (inf: nothing spent at that look)."""
    z_nominal_alphas: list[float] = field(init=False)
    """Their two-sided p-values: the thresholds for z statistics, too loose for t at small n."""
    nominal_alphas: list[float] = field(init=False)
    """The thresholds `decide` uses."""

    def __post_init__(self) -> None:
        if not self.looks or self.looks[0] < 2 or any(b <= a for a, b in zip(self.looks, self.looks[1:])):
            raise ValueError(f"looks must be increasing seed counts >= 2, got {self.looks}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha {self.alpha} not in (0, 1)")
        fractions = [n / self.looks[-1] for n in self.looks]
        spent = [spent_alpha(t, self.alpha, self.spending) for t in fractions]
        increments = [b - a for a, b in zip([0.0, *spent], spent)]
        self.z_bounds = _boundaries(fractions, increments)
        self.z_nominal_alphas = [float(2 * stats.norm.sf(c)) for c in self.z_bounds]
        if self.test == "z":
            self.nominal_alphas = list(self.z_nominal_alphas)
            return
        if self.test not in ("paired", "welch"):
            raise ValueError(f"unknown test {self.test!r}: paired, welch or z")
        margin = 2 * math.sqrt(self.alpha * (1 - self.alpha) / self.calibration_paths)
        shrink = max(self.alpha - margin, 0.0) / self.alpha
        self.nominal_alphas = list(_t_thresholds(tuple(self.looks), tuple(a * shrink for a in spent),
                                                 self.test == "paired", self.calibration_paths))

    def nominal_alpha(self, look_index: int) -> float:
        """The two-sided p-value threshold at look `look_index` (0-based)."""
        return self.nominal_alphas[look_index]

    def decide(self, look_index: int, p_value: float) -> bool:
        """Reject the null at this look (p below its threshold); NaN p never rejects."""
        return not math.isnan(p_value) and p_value < self.nominal_alphas[look_index]


def rejection_rate(looks: Sequence[int], nominal_alphas: Sequence[float], n_sim: int, rng: np.random.Generator,
                   paired: bool = True, effect: float = 0.0) -> float:
    """The share of simulated sweeps that reject at some look when look k rejects at p <
    nominal_alphas[k] (stopping at the first rejection is the same as asking whether any look
    rejects): paired, per-seed contrasts ~ N(effect, 1) and scipy's one-sample t-test on the
    first n_k; Welch, cells N(effect, 1) and N(0, 1) and scipy's Welch test on their first n_k
    values. effect 0 gives the false-positive rate, others the power."""
    last = looks[-1]
    rejected = np.zeros(n_sim, dtype=bool)
    if paired:
        data = rng.standard_normal((n_sim, last)) + effect
        for n, threshold in zip(looks, nominal_alphas):
            rejected |= stats.ttest_1samp(data[:, :n], 0.0, axis=1).pvalue < threshold
    else:
        treated = rng.standard_normal((n_sim, last)) + effect
        control = rng.standard_normal((n_sim, last))
        for n, threshold in zip(looks, nominal_alphas):
            rejected |= stats.ttest_ind(treated[:, :n], control[:, :n], axis=1, equal_var=False).pvalue < threshold
    return float(rejected.mean())


def simulate_false_positive_rate(design: SequentialDesign, n_sim: int, rng: np.random.Generator,
                                 paired: bool = True) -> float:
    """The design's family-wise false-positive rate under the null: normal data, the paired (or
    Welch) t-test at every look, stop at the first rejection."""
    return rejection_rate(design.looks, design.nominal_alphas, n_sim, rng, paired=paired)
