"""`python -m bench.cost_accuracy`: how close the cost estimate (sweeps/analysis/cost.py) comes to
the hours a sweep then takes, on a real local Ray and MLflow store.

A small digits sweep (one pretrained model, one STE trial) runs first; from its two runs in MLflow
the larger grid (3 pretrained models, 6 STE and BNEW trials) is estimated, as `bnew sweep plan`
would, on the trial slots this machine has. The larger grid then runs `--repeats` times, each on
new seeds (so no stage is reused) and each against the same estimate. Per repeat: the wall time
(first trial start to last trial end) and the trial-seconds (the trials' run times summed, per
phase and in all), the medians, and actual / estimated. Sweeps run with `--local`, whatever
RAY_ADDRESS says."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from sweeps.analysis.cost import Estimate, estimate
from sweeps.core.plan import build_plan
from sweeps.core.schema import ROLE_TAG
from sweeps.core.spec import load_spec
from sweeps.records.tracker import Tracker
from sweeps.run.resources import trial_resources, visible_slots

PHASES = ("pretrain", "quantise")
LARGER_SEEDS = 3
"""Seeds of the larger grid: 3 pretrained models and 6 trials (STE and BNEW on each)."""


def digits_spec(directory: Path, name: str, optimisers: list[str], seeds: list[int]) -> Path:
    """A few seconds of training per stage: a pretrained model per seed and a quantise trial per optimiser."""
    spec = {"name": name, "axes": {"dataset": ["digits"], "optimiser": optimisers, "seed": seeds, "budget": [4]},
            "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": 3}},
            "optimisers": {"bnew": {"lambda_rate": 5.0, "freeze_epochs": 1}}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bnew(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """`bnew ARGS` with its stores in `cwd`, no cluster address, and a Ray temp folder of its own
    (Ray's socket paths must stay short)."""
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update(BNEW_PROJECT_DIR=str(cwd), RAY_TMPDIR=tempfile.mkdtemp(prefix="bnew-ray-", dir="/tmp"))
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        raise SystemExit(f"bench.cost_accuracy: `{' '.join(map(str, result.args[3:]))}` exited "
                         f"{result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def actual(tracker: Tracker, sweep: str) -> dict[str, float]:
    """Wall seconds and trial-seconds (per phase and in all) of the sweep's trial runs."""
    experiment = tracker.client.get_experiment_by_name(sweep)
    runs = tracker.client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    seconds = {phase: sum(run.info.end_time - run.info.start_time for run in runs
                          if run.data.params["phase"] == phase) / 1000 for phase in PHASES}
    return {"wall": (max(run.info.end_time for run in runs) - min(run.info.start_time for run in runs)) / 1000,
            "trial": sum(seconds.values()), **seconds}


def estimated(cost: Estimate) -> dict[str, float]:
    """The same figures from the estimate."""
    phases = {phase: cost.phases[phase].seconds for phase in PHASES}
    return {"wall": cost.wall_s, "trial": cost.total_s, **phases}  # type: ignore[dict-item]  # MLflow has them all


def table(estimate_row: dict[str, float], repeats: list[dict[str, float]]) -> str:
    columns = ("wall", "trial", *PHASES)
    medians = {column: statistics.median(row[column] for row in repeats) for column in columns}
    lines = [f"{'':<22}" + "".join(f"{name:>14}" for name in ("wall s", "trial-s", "pretrain s", "quantise s",
                                                                "command s"))]

    def row(label: str, values: dict[str, float], fmt: str = "{:>14.1f}") -> str:
        return f"{label:<22}" + "".join(fmt.format(values[column]) if column in values else f"{'':>14}"
                                        for column in (*columns, "command"))

    lines.append(row("estimated", estimate_row))
    lines += [row(f"actual, repeat {index}", values) for index, values in enumerate(repeats, 1)]
    lines.append(row(f"actual, median of {len(repeats)}", {**medians, "command": statistics.median(
        values["command"] for values in repeats)}))
    lines.append(row("median / estimated", {column: medians[column] / estimate_row[column] for column in columns},
                     "{:>13.2f}x"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.cost_accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the larger grid")
    parser.add_argument("--work", type=Path, default=None, help="the project folder (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats: at least 1")
    load_before = os.getloadavg()
    os.environ.pop("RAY_ADDRESS", None)  # the slots are this machine's, as the `--local` sweeps have them
    work = args.work or Path(tempfile.mkdtemp(prefix="bnew-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(f"sqlite:///{work / '.bnew' / 'mlflow.db'}")
    succeeded(bnew("sweep", "run", str(digits_spec(work, "small", ["ste"], [100])), "--local", cwd=work))

    specs = [digits_spec(work, f"larger-{repeat}", ["ste", "bnew"],
                         list(range(LARGER_SEEDS * repeat, LARGER_SEEDS * (repeat + 1)))) for repeat in range(args.repeats)]
    plan = build_plan(load_spec(str(specs[0])))
    slots, slots_from = visible_slots(trial_resources(plan.spec), None)
    cost = estimate(plan, set(plan.stages), slots, slots_from, tracker)
    repeats = []
    for index, spec in enumerate(specs, 1):
        started = time.perf_counter()
        succeeded(bnew("sweep", "run", str(spec), "--local", cwd=work))
        repeats.append({**actual(tracker, spec.stem), "command": time.perf_counter() - started})
        print(f"repeat {index}/{args.repeats}: {repeats[-1]['wall']:.1f} s wall", file=sys.stderr, flush=True)
    stages = ", ".join(f"{phase.stages} {name}" for name, phase in cost.phases.items())
    header = [f"bench.cost_accuracy: a digits grid ({stages}) estimated from a 2-stage sweep's runs in MLflow, "
              f"{cost.slots} trials at once ({cost.slots_from}), against {args.repeats} runs of it",
              *(f"  {label}: {source}" for label, source in cost.sources.items()),
              f"  load average (1, 5, 15 min) at the start {' '.join(f'{load:.1f}' for load in load_before)}, "
              f"at the end {' '.join(f'{load:.1f}' for load in os.getloadavg())}; "
              "command s: the whole `bnew sweep run`, Ray's start included"]
    text = "\n".join([*header, table(estimated(cost), repeats)])
    print(text)
    return text


if __name__ == "__main__":
    main()
