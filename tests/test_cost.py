"""The hours a sweep costs (sweeps/analysis/cost.py): laying stages out on trial slots, the bench's
figures, the estimate's arithmetic from epoch times in MLflow (runs written here, at times the test
chooses), and what `run`, `report` and `plan` make of it around a real sweep. How close the
estimate comes to the time a sweep then takes is measured by `python -m bench.cost_accuracy`
(bench/RESULTS.md), not tested: on a shared machine that is a benchmark figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from mlflow.entities import Metric

from bench.cost_accuracy import bnew, digits_spec
from sweeps.analysis.cost import (
    BENCH_FIGURES,
    Estimate,
    PhaseCost,
    bench_time,
    estimate,
    estimate_lines,
    hours,
    workload,
)
from sweeps.core.plan import Stage, build_plan
from sweeps.core.schedule import makespan
from sweeps.core.schema import (
    DEVICE_TAGS,
    ESTIMATE_TAG,
    RESUMED_FROM_TAG,
    REUSED_FROM_TAG,
    ROLE_TAG,
    STOPPED_EARLY_TAG,
)
from sweeps.core.spec import load_spec, parse_spec
from sweeps.records.tracker import Tracker
from sweeps.run.resources import trial_resources, visible_slots


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


RECORDED_FROM_MS = 1_700_000_000_000
"""When the runs written here start; their times below are seconds after it."""


def record_run(tracker: Tracker, stage: Stage, start_s: float, epochs_at_s: list[float], end_s: float,
               status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
    """A trial run of `stage` as a sweep leaves it in MLflow: the stage's config as params, the
    device it trained on, an `epoch` metric stamped at each of `epochs_at_s`, its start and end."""
    client, experiment_id = tracker.client, tracker.experiment_id("recorded")

    def ms(seconds: float) -> int:
        return RECORDED_FROM_MS + round(seconds * 1000)

    run_id = client.create_run(experiment_id, start_time=ms(start_s),
                               tags={ROLE_TAG: "trial", DEVICE_TAGS["device"]: "cpu", **(tags or {})}).info.run_id
    tracker.log_params(run_id, stage.config)
    client.log_batch(run_id, metrics=[Metric("epoch", step, ms(at), step) for step, at in enumerate(epochs_at_s)])
    client.set_terminated(run_id, status, end_time=ms(end_s))


def first_stage(stages: dict[str, Stage], phase: str) -> Stage:
    return next(stage for stage in stages.values() if stage.phase == phase)


def test_the_estimate_is_the_arithmetic_of_the_epoch_times_in_mlflow(tmp_path: Path) -> None:
    """Three finished runs of the grid's one workload (digits ResNet-20, batch 64, CPU) took 2, 3 and
    5 s an epoch between their first and last epochs, and 4, 1 and 3 s beyond their epochs: at the
    medians, 3 s an epoch and 3 s a stage, a pretrain (3 epochs) takes 12 s and a trial (4 epochs)
    15 s. A one-epoch run counts as a run but cannot split its time; a run that did not train as
    timed (failed, linked from another sweep, stopped early, resumed, on another device) is left out."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plan = build_plan(load_spec(str(digits_spec(tmp_path, "larger", ["ste", "bnew"], [0, 1, 2]))))
    pretrain = first_stage(plan.stages, "pretrain")  # every stage of the grid is one workload
    record_run(tracker, pretrain, 0, [5, 7, 9], 10)
    record_run(tracker, pretrain, 20, [23, 26, 29, 32], 33)
    record_run(tracker, pretrain, 40, [41, 46], 53)
    record_run(tracker, pretrain, 60, [61], 160)
    left_out: list[dict[str, Any]] = [
        {"status": "FAILED"}, {"tags": {REUSED_FROM_TAG: "elsewhere"}}, {"tags": {STOPPED_EARLY_TAG: "1"}},
        {"tags": {RESUMED_FROM_TAG: "1"}}, {"tags": {DEVICE_TAGS["device"]: "cuda"}}]
    for how in left_out:  # the newest runs, 100 s an epoch: any of them would move the medians
        record_run(tracker, pretrain, 200, [201, 301, 401], 500, **how)

    cost = estimate(plan, set(plan.stages), 2, "two slots", tracker)
    assert cost.phases == {"pretrain": PhaseCost(3, 9, 3 * 12.0), "quantise": PhaseCost(6, 24, 6 * 15.0)}
    assert cost.total_s == 126.0 and cost.slots == 2 and cost.slots_from == "two slots"
    assert cost.sources == {"digits resnet20, batch 64, cpu": "MLflow, 4 finished runs"}
    # On two slots: pretrains 0 and 1 (0-12 s), then pretrain 2 (12-24) beside the first trial
    # (12-27), then the other five trials as slots free: 24-39, 27-42, 39-54, 42-57, 54-69.
    # One slot: one stage after another; nine: the chain of a pretrain and its trial.
    walls = {slots: estimate(plan, set(plan.stages), slots, "", tracker).wall_s for slots in (1, 2, 9)}
    assert walls == {1: 126.0, 2: 69.0, 9: 27.0}
    # The pretrained models reused: only the trials, two at a time.
    trials = {key for key, stage in plan.stages.items() if stage.phase == "quantise"}
    reused = estimate(plan, trials, 2, "two slots", tracker)
    assert reused.phases == {"quantise": PhaseCost(6, 24, 90.0)} and reused.wall_s == 45.0


def test_a_workload_without_runs_in_mlflow_takes_the_bench_figures(tmp_path: Path) -> None:
    """The demo's teachers are a network MLflow has no run of here: they take the bench's figures
    for digits (22 batches of 64 of its 1,437 training images, its 360 test images evaluated twice,
    on the one thread of a 1-CPU trial); its ResNet-20 stages the one recorded run's 1 s an epoch
    and 2 s beyond. Per seed: teacher (8 epochs) -> pretrain (8) -> 4 trials (10), the two seeds
    side by side on two slots."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    plan = build_plan(load_spec("demo"))
    record_run(tracker, first_stage(plan.stages, "pretrain"), 0, [1, 2, 3], 5)
    figure = BENCH_FIGURES[("cpu", "8x8")]
    teacher_s = figure.stage_overhead_s + 8 * (22 * 64 * figure.train_s_per_image + 2 * 360 * figure.eval_s_per_image)

    cost = estimate(plan, set(plan.stages), 2, "two slots", tracker)
    assert (cost.phases["teacher"].stages, cost.phases["teacher"].epochs) == (2, 16)
    assert cost.phases["teacher"].seconds == pytest.approx(2 * teacher_s, rel=1e-12)
    assert cost.phases["pretrain"] == PhaseCost(2, 16, 2 * (2 + 8 * 1.0))
    assert cost.phases["quantise"] == PhaseCost(8, 80, 8 * (2 + 10 * 1.0))
    assert cost.wall_s == pytest.approx(teacher_s + 10 + 4 * 12, rel=1e-12)
    sources = {"digits teacher, batch 64, cpu": figure.source,
               "digits resnet20 distilled, batch 64, cpu": "MLflow, 1 finished runs"}
    assert cost.sources == sources
    assert sorted(estimate_lines(cost)[1:]) == sorted(f"  {label}: {source}" for label, source in sources.items())


@pytest.mark.slow
def test_run_report_and_plan_show_the_estimate_of_a_real_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-stage digits sweep on a local Ray: `run` prints its estimate and keeps it on the parent
    run, `report` sets it against the hours its trials took in MLflow, and `plan` of a larger grid
    of the same workload prints the estimate made from the sweep's two runs."""
    small = bnew("sweep", "run", str(digits_spec(tmp_path, "small", ["ste"], [100])), "--local", cwd=tmp_path)
    assert small.returncode == 0, small.stdout[-3000:] + small.stderr[-3000:]
    uri = f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}"
    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id("small", create=False)
    (parent,) = tracker.client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")
    recorded = Estimate.from_json(parent.data.tags[ESTIMATE_TAG])
    assert {name: phase.stages for name, phase in recorded.phases.items()} == {"pretrain": 1, "quantise": 1}
    assert recorded.sources == {"digits resnet20, batch 64, cpu": BENCH_FIGURES[("cpu", "8x8")].source}  # MLflow had none
    assert estimate_lines(recorded)[0] in small.stdout.splitlines(), small.stdout[-3000:]

    report = bnew("sweep", "report", "small", "--no-log", "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    lines = report.stdout.splitlines()
    section = lines[lines.index("## Hours: estimated against actual"):]
    assert section[2] == f"Estimated when the sweep first started, for {recorded.slots} trials at once (the Ray cluster: 1 node)."
    runs = tracker.client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    took = {run.data.params["phase"]: (run.info.end_time - run.info.start_time) / 1000 for run in runs}
    took["all (wall time)"] = (max(run.info.end_time for run in runs) - min(run.info.start_time for run in runs)) / 1000
    estimated = {**{name: phase.seconds for name, phase in recorded.phases.items()}, "all (wall time)": recorded.wall_s}
    counts = {"pretrain": 1, "quantise": 1, "all (wall time)": 2}
    for name, count in counts.items():
        assert (f"| {name} | {count} | {hours(estimated[name])} | {hours(took[name])} | "
                f"{took[name] / estimated[name]:.2f} |") in section, section

    larger = digits_spec(tmp_path, "larger", ["ste", "bnew"], [0, 1, 2])
    shown = bnew("sweep", "plan", str(larger), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # as the command ran
    plan = build_plan(load_spec(str(larger)))
    slots, where = visible_slots(trial_resources(plan.spec), None)
    assert where == f"this machine's {os.cpu_count()} CPUs, GPUs not counted: no --address or RAY_ADDRESS"
    cost = estimate(plan, set(plan.stages), slots, where, tracker)
    assert cost.sources == {"digits resnet20, batch 64, cpu": "MLflow, 2 finished runs"}
    for line in estimate_lines(cost):
        assert line in shown.stdout.splitlines(), shown.stdout
