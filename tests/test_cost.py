"""The hours a sweep costs (sweeps/analysis/cost.py): laying stages out on trial slots, the bench's
figures, and, for real, a larger digits grid estimated from a small sweep's runs in MLflow
against the time it then takes, with the report setting one against the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sweeps.analysis.cost import BENCH_FIGURES, Estimate, bench_time, estimate, workload
from sweeps.core.plan import build_plan
from sweeps.core.schedule import makespan
from sweeps.core.spec import load_spec, parse_spec
from sweeps.records.tracker import Tracker


def test_stages_wait_for_their_inputs_and_a_free_slot() -> None:
    plan = build_plan(load_spec("demo"))  # per seed: teacher -> pretrain -> 4 quantise trials
    seconds = {key: 10.0 for key in plan.stages}
    assert makespan(list(plan.stages.values()), seconds, 1) == 120  # one at a time
    assert makespan(list(plan.stages.values()), seconds, 2) == 60  # the two seeds side by side
    assert makespan(list(plan.stages.values()), seconds, 100) == 30  # the chain teacher, pretrain, trial


def test_bench_figures_give_the_cpu_projection_of_bench_results() -> None:
    """paper-table2 on the CPU (`--set resources.gpu=0`): 33,000 trial-epochs at the bench's ~34 s
    an epoch on two threads, the ~304 h bench/RESULTS.md projects, one trial at a time; a trial of
    one CPU has one thread, so two at once take as long. On GPUs there is no figure yet."""
    spec = load_spec("paper-table2").model_dump(mode="json")
    costs = {}
    for cpus in (2.0, 1.0):
        plan = build_plan(parse_spec({**spec, "resources": {"cpu": cpus, "gpu": 0.0}}, "cpu"))
        costs[cpus] = estimate(plan, set(plan.stages), int(2 // cpus), "two CPUs", tracker=None)
    assert 295 * 3600 < costs[2.0].total_s < 315 * 3600 and costs[2.0].wall_s == pytest.approx(costs[2.0].total_s)
    assert costs[1.0].wall_s == pytest.approx(costs[2.0].wall_s, rel=0.02)
    cost = costs[1.0]
    gpu = build_plan(load_spec("paper-table2"))
    assert {load.device for load in map(lambda s: workload(s, 0.25), gpu.stages.values())} == {"cuda"}
    assert estimate(gpu, set(gpu.stages), 8, "eight quarters", tracker=None).total_s is None
    assert not any(device == "cuda" for device, _ in BENCH_FIGURES)
    # A capped dry run trains only its batches but evaluates the whole test split.
    capped = build_plan(load_spec("demo"), max_batches=2)
    stage = next(stage for stage in capped.stages.values() if stage.phase == "pretrain")
    figure = BENCH_FIGURES[("cpu", "8x8")]
    assert bench_time(workload(stage, 0), 1).epoch_s == pytest.approx(
        2 * 64 * figure.train_s_per_image + 2 * 360 * figure.eval_s_per_image)
    assert Estimate.from_json(cost.to_json()) == cost


def digits_spec(directory: Path, name: str, optimisers: list[str], seeds: list[int]) -> Path:
    """A few seconds of training per stage: a pretrained model per seed and a quantise trial per optimiser."""
    spec = {"name": name, "axes": {"dataset": ["digits"], "optimiser": optimisers, "seed": seeds, "budget": [4]},
            "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": 3}},
            "optimisers": {"bnew": {"lambda_rate": 5.0, "freeze_epochs": 1}}}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bnew(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="bnew-ray-", dir="/tmp")
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_a_larger_grid_takes_what_a_small_sweep_of_it_predicts(tmp_path: Path) -> None:
    small = bnew("sweep", "run", str(digits_spec(tmp_path, "small", ["ste"], [100])), "--local", cwd=tmp_path)
    assert small.returncode == 0, small.stdout[-3000:] + small.stderr[-3000:]

    larger = digits_spec(tmp_path, "larger", ["ste", "bnew"], [0, 1, 2])  # 3 pretrained models, 6 trials
    shown = bnew("sweep", "plan", str(larger), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "(this machine's 2 CPUs, GPUs not counted: no --address or RAY_ADDRESS)" in shown.stdout
    assert "digits resnet20, batch 64, cpu: MLflow, 2 finished runs" in shown.stdout, shown.stdout
    uri = f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}"
    plan = build_plan(load_spec(str(larger)))
    predicted = estimate(plan, set(plan.stages), os.cpu_count(), "this machine", Tracker(uri))

    started = time.monotonic()
    run = bnew("sweep", "run", str(larger), "--local", cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "estimated hours: " in run.stdout
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("larger")
    runs = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'")
    assert len(runs) == 9
    wall = (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000
    trial_s = sum(r.info.end_time - r.info.start_time for r in runs) / 1000
    print(f"estimated {predicted.wall_s:.1f} s wall, {predicted.total_s:.1f} trial-s; measured {wall:.1f} s wall, "
          f"{trial_s:.1f} trial-s (the sweep's command took {time.monotonic() - started:.0f} s)")
    assert abs(predicted.wall_s - wall) <= 0.3 * wall
    assert abs(predicted.total_s - trial_s) <= 0.3 * trial_s

    (parent,) = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'sweep'")
    recorded = Estimate.from_json(parent.data.tags["bnew.estimate"])
    assert set(recorded.phases) == {"pretrain", "quantise"} and recorded.slots == 2
    assert json.loads(parent.data.tags["bnew.estimate"])["sources"]
    report = bnew("sweep", "report", "larger", "--no-log", "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    section = lines[lines.index("## Hours: estimated against actual"):]
    assert section[2].startswith("Estimated when the sweep first started, for 2 trials at once (the Ray cluster: 1 node)")
    rows = [line for line in section if line.startswith(("| pretrain |", "| quantise |", "| all (wall time) |"))]
    assert [row.split(" | ")[1] for row in rows] == ["3", "6", "9"], section
