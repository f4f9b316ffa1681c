"""Recompute every claim of this study from the per-seed values in its claims.csv, with scipy and
statsmodels only (not the sweep's own statistics), and print them beside what the report says:

    python studies/cifar10-cpu/recompute.py [path/to/claims.csv]

Per claim: the per-seed contrast rebuilt from the cells' values (`cell_values`), its one-sample
t-test (the paired test), what Welch's test would have said ignoring the pairing, the 95% CI, the
MDE at 80% power (statsmodels' TTestPower), and the group-sequential boundary the verdict read
(O'Brien-Fleming over the planned rounds, alpha 0.05 / 5 claims; the only figure taken from the
package, since its calibration is a simulation). Exits 1 if any figure disagrees with the CSV."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.power import TTestPower

from sweeps.analysis.sequential import SequentialDesign

LOOKS = [3, 6, 9, 12]
"""The preset's rounds: seeds {start: 3, step: 3, max: 12}."""
ALPHA_PER_CLAIM = 0.05 / 5


def cells_of(row: pd.Series) -> list[tuple[int, dict[str, float]]]:
    """`+1 label: 0:33.1 1:34.2; -1 label: ...` -> [(coefficient, {seed: value})]."""
    cells = []
    for part in row.cell_values.split("; "):
        head, values = part.split(": ", 1)
        pairs = (pair.split(":") for pair in values.split())
        cells.append((int(head.split()[0]), {seed: float(value) for seed, value in pairs}))
    return cells


def recompute(row: pd.Series) -> dict[str, float]:
    cells = cells_of(row)
    seeds = sorted(set.intersection(*(set(values) for _, values in cells)), key=int)
    contrast = np.array([sum(sign * values[seed] for sign, values in cells) for seed in seeds])
    n = len(contrast)
    test = stats.ttest_1samp(contrast, 0.0)
    half = stats.t.ppf(0.975, n - 1) * contrast.std(ddof=1) / math.sqrt(n)
    sd = contrast.std(ddof=1)
    mde = sd * TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    # Welch ignoring the pairing (two-cell claims only): what the study used before
    welch = (stats.ttest_ind([cells[0][1][s] for s in seeds], [cells[1][1][s] for s in seeds], equal_var=False).pvalue
             if len(cells) == 2 else math.nan)
    boundary = SequentialDesign(LOOKS, alpha=ALPHA_PER_CLAIM).nominal_alpha(LOOKS.index(n))
    return {"n": n, "effect": contrast.mean(), "p_value": test.pvalue, "ci_low": contrast.mean() - half,
            "ci_high": contrast.mean() + half, "mde": mde, "threshold": boundary, "welch_p": welch}


def main(path: Path) -> int:
    claims = pd.read_csv(path)
    disagree = 0
    print(f"{'claim':5} {'n':>2} {'effect':>7} {'95% CI':>16} {'p (paired)':>10} {'p (Welch)':>9} {'boundary':>9} "
          f"{'MDE':>6}  verdict")
    for _, row in claims.iterrows():
        mine = recompute(row)
        for key, value in mine.items():
            if key != "welch_p" and not math.isclose(value, row[key], rel_tol=1e-6, abs_tol=1e-9):
                print(f"  {row.claim}: {key} {value!r} here, {row[key]!r} in {path}")
                disagree += 1
        print(f"{row.claim.split()[0]:5} {mine['n']:>2} {mine['effect']:>+7.2f} [{mine['ci_low']:+6.2f}, {mine['ci_high']:+6.2f}] "
              f"{mine['p_value']:>10.3g} {mine['welch_p']:>9.3g} {mine['threshold']:>9.3g} {mine['mde']:>6.2f}  "
              f"{row.verdict}")
    print("every figure agrees with the CSV" if not disagree else f"{disagree} figures disagree")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("claims.csv")))
