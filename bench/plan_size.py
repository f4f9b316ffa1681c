"""`python -m bench.plan_size`: how long `bnew sweep plan` takes as a grid grows, and how soon a
grid over the size limit is refused.

Each size is the `demo` preset with as many seeds as make that many trials (4 optimisers a seed),
planned by `bnew sweep plan SPEC --no-lookup --yes` in a subprocess (start-up included) and
`--repeats` times; the refusal is the same command without `--yes`. Prints the median wall and
CPU seconds (the CPU time of the command's process: on a loaded machine wall time is the CPU's
share, not the code's)."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sweeps.core.spec import PRESET_DIR

SIZES = (1_000, 10_000, 20_000, 100_000)


def timed(arguments: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds of `bnew ARGS`, and its exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "sweeps.cli", *arguments], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "BNEW_PROJECT_DIR": str(cwd)}).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    demo = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    print(f"bnew sweep plan, median of {args.repeats}")
    print(f"{'trials':>8} {'command':<26} {'wall s':>7} {'cpu s':>6} {'exit':>5}")
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        for trials in SIZES:
            spec = cwd / f"grid-{trials}.yaml"
            spec.write_text(yaml.safe_dump({**demo, "name": f"grid-{trials}",
                                            "axes": {**demo["axes"], "seed": list(range(trials // 4))}}))
            for label, extra in (("plan --yes", ["--yes"]), ("plan (refused over 1,000)", [])):
                if not extra and trials <= 1_000:
                    continue
                runs = [timed(["sweep", "plan", str(spec), "--no-lookup", *extra], cwd) for _ in range(args.repeats)]
                wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
                print(f"{trials:>8} {label:<26} {wall:>7.2f} {cpu:>6.2f} {runs[0][2]:>5}")


if __name__ == "__main__":
    main()
