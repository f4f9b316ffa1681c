"""`python -m bench.plan_size`: how long `bnew sweep plan` takes as a grid grows (with the cost
estimate it prints, whose wall time lays every stage out on the trial slots), how soon a grid over
the size limit is refused, and the layout alone against the old quadratic one.

Each size is the `demo` preset with as many seeds as make that many trials (4 optimisers a seed),
planned by `bnew sweep plan SPEC --no-lookup --yes` in a subprocess (start-up included) and
`--repeats` times; the refusal is the same command without `--yes`. Prints the median wall and
CPU seconds (the CPU time of the command's process: on a loaded machine wall time is the CPU's
share, not the code's). The layout (`sweeps.core.schedule.makespan`, on 2 slots, each stage its
epochs in seconds) is timed in this process, and up to `--old-up-to` trials so is the scan of
every waiting stage after each one finishes that it replaced (tests/test_schedule.py's oracle),
with the ratio, after checking that both give the same makespan."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from sweeps.core.plan import Stage, build_plan
from sweeps.core.schedule import makespan
from sweeps.core.spec import PRESET_DIR, parse_spec
from tests.test_schedule import scanned_makespan

SIZES = (1_000, 5_000, 20_000, 100_000)
SLOTS = 2


def timed(arguments: list[str], cwd: Path) -> tuple[float, float, int]:
    """Wall and CPU seconds of `bnew ARGS`, and its exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    status = subprocess.run([sys.executable, "-m", "sweeps.cli", *arguments], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "BNEW_PROJECT_DIR": str(cwd)}).returncode
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), status


def median_command(arguments: list[str], cwd: Path, repeats: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds of `repeats` runs of `bnew ARGS`, and the first run's exit status."""
    runs = [timed(arguments, cwd) for _ in range(repeats)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[0][2]


def median_layout(layout: Callable[[list[Stage], dict[str, float], int], float], stages: list[Stage],
                  seconds: dict[str, float], repeats: int) -> tuple[float, float]:
    """Median seconds (process CPU time) of `layout(stages, seconds, SLOTS)`, and the makespan it gives."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        span = layout(stages, seconds, SLOTS)
        times.append(time.process_time() - start)
    return statistics.median(times), span


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--old-up-to", type=int, default=5_000, help="Largest size to time the old layout on.")
    args = parser.parse_args()
    demo = yaml.safe_load((PRESET_DIR / "demo.yaml").read_text())
    print(f"bnew sweep plan --no-lookup, median of {args.repeats}; layout on {SLOTS} slots in CPU s")
    print(f"| trials | stages | plan --yes wall s | cpu s | refused wall s | cpu s | exit | "
          f"layout s | old layout s | old/new |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        cwd = Path(folder)
        for trials in SIZES:
            grid = {**demo, "name": f"grid-{trials}", "axes": {**demo["axes"], "seed": list(range(trials // 4))}}
            spec = cwd / f"grid-{trials}.yaml"
            spec.write_text(yaml.safe_dump(grid))
            command = ["sweep", "plan", str(spec), "--no-lookup"]
            plan_wall, plan_cpu, plan_exit = median_command([*command, "--yes"], cwd, args.repeats)
            refused = median_command(command, cwd, args.repeats) if trials > 1_000 else None
            stages = list(build_plan(parse_spec(grid, str(spec))).stages.values())
            seconds = {stage.key: float(stage.epochs) for stage in stages}
            new_s, span = median_layout(makespan, stages, seconds, args.repeats)
            old = "-", "-"
            if trials <= args.old_up_to:
                old_s, old_span = median_layout(scanned_makespan, stages, seconds, args.repeats)
                if old_span != span:
                    raise SystemExit(f"{trials} trials: the layouts differ ({old_span} s against {span} s)")
                old = f"{old_s:.3f}", f"{old_s / new_s:.0f}x"
            refusal = f"{refused[0]:.2f} | {refused[1]:.2f} | {refused[2]}" if refused else "- | - | -"
            print(f"| {trials:,} | {len(stages):,} | {plan_wall:.2f} | {plan_cpu:.2f} | {refusal} | "
                  f"{new_s:.3f} | {old[0]} | {old[1]} |")
            if plan_exit:
                raise SystemExit(f"{trials} trials: `plan --yes` exited {plan_exit}")


if __name__ == "__main__":
    main()
