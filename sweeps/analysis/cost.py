"""What a sweep costs in hours: estimated before it runs (`bnew sweep plan`, and recorded on the
parent run when the sweep first starts) and set against the hours it took (`bnew sweep report`).

A stage takes `overhead + epochs x seconds per epoch` of its workload: its dataset (with the
settings that change its size), network (and the teacher it distils from), batch size, batch cap
and device type. Both figures come from finished stages of the same workload in MLflow, in any
experiment: a run's start and end times, split by the timestamps of its first and last epochs
(each epoch between them is a whole one: training, evaluation, checkpoint, logging). Where MLflow
has none, from the bench's figures below. The wall time lays the stages out on the trial slots
the cluster has, as the driver starts them (`sweeps.core.schedule.makespan`); searches follow the
stage graph, as in the driver."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from sweeps.core.dotted import flatten
from sweeps.core.plan import Plan, Stage
from sweeps.core.schedule import makespan
from sweeps.core.schema import (
    DEVICE_TAGS,
    ESTIMATE_TAG,
    PHASES,
    RESUMED_FROM_TAG,
    REUSED_FROM_TAG,
    ROLE_TAG,
    STOPPED_EARLY_TAG,
    quote,
)
from sweeps.core.search import searched_templates, tuned_cells

if TYPE_CHECKING:  # `plan --no-lookup` estimates without loading MLflow
    from mlflow.entities import Run

    from sweeps.records.sweep_runs import SweepRuns
    from sweeps.records.tracker import Tracker

WORKLOAD_FIELDS = ("data.name", "data.val_size", "data.train_limit", "data.test_limit", "data.synthetic_size",
                   "model.arch", "model.real_valued", "distillation", "batch_size", "max_batches")
"""Trainer settings that change how long an epoch takes (with the phase: a teacher is another network)."""
RUNS_PER_WORKLOAD = 10
"""The newest finished runs of a workload that its figures are the median of."""


@dataclass(frozen=True)
class BenchFigure:
    """What the bench measured for one device type and image size."""

    train_s_per_image: float
    eval_s_per_image: float
    stage_overhead_s: float
    threads: int
    """The CPU threads it was measured with: a CPU trial gets as many threads as it reserves CPUs
    (Ray's OMP_NUM_THREADS), and with fewer trains that much slower."""
    source: str


BENCH_FIGURES = {
    ("cpu", "32x32"): BenchFigure(
        1 / 1597, 5.1 / 25_000, 1.41, 2,
        "bench figure: ResNet-20 on CIFAR-10, batch 128, compiled, 2-core CPU (bench/RESULTS.md, 2026-11-29; "
        "overhead: bench.sweep_load's slot time per trial)"),
    ("cpu", "8x8"): BenchFigure(
        1.07e-3, 2.8e-4, 1.65, 1,
        "bench figure: ResNet-20 on digits, batch 64, eager, one thread of the 2-core CPU at load ~10 (2026-11-30: "
        "`OMP_NUM_THREADS=1 bnew train --phase pretrain --epochs 6 --batch-size 64 --device cpu`, epochs 2-6; "
        "overhead: the demo's ResNet-20 stages)"),
}
"""Bench figures by (device type, image size): seconds per training image and per evaluated image
(the test split twice, float and binary, and the validation split), and per stage beyond its
epochs. The teacher and distillation were not benched apart: every network counts as ResNet-20,
as the bench's projections do. No GPU has been benched yet (bench/gpu_check.sh measures it)."""
NO_FIGURE = "no figure: no finished run of it in MLflow, and no bench figure (none for GPUs yet: bench/gpu_check.sh)"
DATASET_IMAGES = {"digits": ("8x8", 1437, 360), "cifar10": ("32x32", 50_000, 10_000),
                  "cifar100": ("32x32", 50_000, 10_000), "imagefolder": ("32x32", 50_000, 10_000),
                  "synthetic": ("16x16", None, None)}
"""Image size, training and test images per dataset; an image folder counts as the shared CIFAR-10
JPEGs, the synthetic set's sizes are its `synthetic_size` and a quarter of it."""


@dataclass(frozen=True)
class Workload:
    """What decides how long a stage's epoch takes."""

    settings: tuple[tuple[str, str], ...]
    """WORKLOAD_FIELDS and their values as MLflow params hold them (`str` of the value)."""
    teacher: bool
    device: str
    """cpu or cuda: the device type its trials train on."""

    def label(self) -> str:
        values = dict(self.settings)
        network = "teacher" if self.teacher else "resnet20" if values["model.arch"] == "None" else values["model.arch"]
        cap = f", {values['max_batches']} batches" if values["max_batches"] != "None" else ""
        distils = " distilled" if values["distillation"] == "True" else ""
        return f"{values['data.name']} {network}{distils}, batch {values['batch_size']}{cap}, {self.device}"


def workload(stage: Stage, gpu: float) -> Workload:
    """A stage's workload; its trials train on a GPU when they reserve one (`resources.gpu`) and
    their `device` is not `cpu`."""
    flat = flatten(stage.config)
    return Workload(tuple((name, str(flat.get(name))) for name in WORKLOAD_FIELDS), stage.phase == "teacher",
                    "cuda" if gpu > 0 and stage.config["device"] != "cpu" else "cpu")


@dataclass(frozen=True)
class StageTime:
    epoch_s: float
    overhead_s: float
    source: str

    def seconds(self, epochs: int) -> float:
        return self.overhead_s + epochs * self.epoch_s


def bench_time(load: Workload, cpus: float) -> StageTime | None:
    """From the bench's figures for a trial of `cpus` CPUs, or None where none was measured for its
    device type and image size."""
    values = dict(load.settings)
    size, train, test = DATASET_IMAGES[values["data.name"]]
    figure = BENCH_FIGURES.get((load.device, size))
    if figure is None:
        return None

    def capped(name: str, count: int) -> int:
        return count if values[name] == "None" else min(int(values[name]), count)

    synthetic, val, batch = (int(values[name]) for name in ("data.synthetic_size", "data.val_size", "batch_size"))
    images = capped("max_batches", capped("data.train_limit", (train or synthetic) - val) // batch) * batch
    evaluated = 2 * capped("data.test_limit", test or max(synthetic // 4, 10)) + val
    slower = figure.threads / min(max(math.floor(cpus), 1), figure.threads) if load.device == "cpu" else 1.0
    return StageTime(slower * (images * figure.train_s_per_image + evaluated * figure.eval_s_per_image),
                     figure.stage_overhead_s, figure.source)


def run_device(run: Run) -> str | None:
    """The device type a run trained on: its `bnew.device` tag, else a `device` param that names one."""
    device = run.data.tags.get(DEVICE_TAGS["device"]) or run.data.params.get("device", "auto")
    return None if device == "auto" else device.partition(":")[0]


def measured_time(tracker: Tracker, experiment_ids: list[str], load: Workload) -> StageTime | None:
    """From the newest finished runs of `load` in MLflow, or None when there are none."""
    clauses = [f"tags.`{ROLE_TAG}` = 'trial'", "attributes.status = 'FINISHED'",
               f"params.phase {'=' if load.teacher else '!='} 'teacher'",
               *(f"params.`{name}` = {quote(value)}" for name, value in load.settings)]
    runs = tracker.client.search_runs(experiment_ids, " and ".join(clauses), order_by=["attributes.start_time DESC"],
                                      max_results=5 * RUNS_PER_WORKLOAD)
    # Not a linked run (it did not train), a stopped one, nor a resumed one (its times span the interruption).
    trained = [run for run in runs if run_device(run) == load.device and run.info.end_time
               and not {REUSED_FROM_TAG, STOPPED_EARLY_TAG, RESUMED_FROM_TAG} & set(run.data.tags)][:RUNS_PER_WORKLOAD]
    split: list[tuple[float, float]] = []  # (seconds per epoch, overhead) of runs of two epochs or more
    whole: list[float] = []  # a one-epoch run: its epoch and its overhead cannot be told apart
    for run in trained:
        stamps = sorted({point.step: point.timestamp for point in tracker.client.get_metric_history(
            run.info.run_id, "epoch")}.values())
        duration = (run.info.end_time - run.info.start_time) / 1000
        if len(stamps) >= 2:
            epoch_s = (stamps[-1] - stamps[0]) / 1000 / (len(stamps) - 1)
            split.append((epoch_s, max(duration - len(stamps) * epoch_s, 0.0)))
        elif stamps:
            whole.append(duration)
    source = f"MLflow, {len(trained)} finished runs"
    if split:
        return StageTime(statistics.median(e for e, _ in split), statistics.median(o for _, o in split), source)
    return StageTime(statistics.median(whole), 0.0, source) if whole else None


@dataclass
class PhaseCost:
    stages: int
    epochs: int
    seconds: float | None
    """Trial-seconds; None when a stage of the phase has no figure."""


@dataclass
class Estimate:
    """A sweep's estimated hours: per phase, in all, and its wall time on `slots` trials at once."""

    phases: dict[str, PhaseCost]
    wall_s: float | None
    slots: int
    slots_from: str
    sources: dict[str, str] = field(default_factory=dict)
    """Workload label -> where its figures come from ("" when none: its phase has no hours)."""

    @property
    def total_s(self) -> float | None:
        known = [phase.seconds for phase in self.phases.values() if phase.seconds is not None]
        return sum(known) if len(known) == len(self.phases) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Estimate":
        data = json.loads(text)
        return cls(**{**data, "phases": {name: PhaseCost(**phase) for name, phase in data["phases"].items()}})


def estimate(plan: Plan, todo: set[str], slots: int, slots_from: str, tracker: Tracker | None) -> Estimate:
    """The hours of the plan's stages in `todo` (the rest are reused) and of its searches, on
    `slots` trials at once (capped by `max_concurrent`); `tracker` None: bench figures only."""
    slots = min(slots, plan.spec.max_concurrent or slots)
    templates = searched_templates(plan)
    stages = [plan.stages[key] for key in plan.stages if key in todo and key not in templates]
    searched = [(cell.templates[0], plan.spec.search.samples * len(cell.templates)) for cell in tuned_cells(plan)]
    experiment_ids = tracker.all_experiment_ids() if tracker else []
    # Each stage's workload once: it flattens the stage's whole config.
    loads = {stage.key: workload(stage, plan.spec.resources.gpu) for stage in [*stages, *(t for t, _ in searched)]}
    times: dict[Workload, StageTime | None] = {}
    for load in loads.values():
        if load not in times:
            times[load] = ((measured_time(tracker, experiment_ids, load) if tracker else None)
                           or bench_time(load, plan.spec.resources.cpu))

    def seconds(stage: Stage) -> float | None:
        time = times[loads[stage.key]]
        return None if time is None else time.seconds(stage.epochs)

    jobs = [(stage.phase, stage, 1) for stage in stages] + [("search", template, n) for template, n in searched]
    phases = {}
    for name in [*PHASES, "search"]:  # a search: at most, a scheduler may stop trials early
        mine = [(seconds(stage), stage.epochs * n, n) for phase, stage, n in jobs if phase == name]
        known = [each * n for each, _, n in mine if each is not None]
        if mine:
            phases[name] = PhaseCost(sum(n for *_, n in mine), sum(epochs for _, epochs, _ in mine),
                                     sum(known) if len(known) == len(mine) else None)
    graph = {stage.key: seconds(stage) for stage in stages}
    search_s = phases["search"].seconds if searched else 0.0
    wall = None
    if slots > 0 and None not in graph.values() and search_s is not None:
        wall = makespan(stages, graph, slots) + search_s / slots  # type: ignore[arg-type]  # no None left
    sources = {load.label(): time.source if time else "" for load, time in times.items()}
    return Estimate(phases, wall, slots, slots_from, sources)


def hours(seconds: float | None) -> str:
    """`0.04 h (2 min)`; hours alone from one hour up; `-` when unknown."""
    if seconds is None:
        return "-"
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 3600:.2f} h ({seconds / 60:.0f} min)" if seconds >= 60 else f"{seconds / 3600:.3f} h ({seconds:.0f} s)"


def estimate_lines(cost: Estimate) -> list[str]:
    """What the plan prints under its table: hours in all, the wall time, where the figures come from."""
    lines = [f"estimated hours: {hours(cost.total_s)} of training in all; wall time {hours(cost.wall_s)} on "
             f"{cost.slots} trials at once ({cost.slots_from})"]
    by_source: dict[str, list[str]] = {}
    for label, source in cost.sources.items():
        by_source.setdefault(source, []).append(label)
    for source, labels in by_source.items():
        lines.append(f"  {'; '.join(labels)}: {source or NO_FIGURE}")
    return lines


def record_estimate(tracker: Tracker, parent_run_id: str, cost: Estimate) -> None:
    """Keep the estimate on the parent run, the first time the sweep starts (a resume's estimate
    covers only what was left; the report sets the first against everything the sweep trained)."""
    if ESTIMATE_TAG not in tracker.client.get_run(parent_run_id).data.tags:
        tracker.client.set_tag(parent_run_id, ESTIMATE_TAG, cost.to_json())


def hours_markdown(sweep: SweepRuns) -> str:
    """Estimated against actual hours per phase, of the stages this sweep trained (not those it
    reused; a search's trials stopped early too): trial-hours (each run's start to end) and, in
    all, the wall time (first start to last end)."""
    trials = sweep.trials
    if trials.empty or not sweep.parent_run_id:
        return ""
    tags = trials.reindex(columns=["reused_from", "cell", "stopped_early"], fill_value="")
    trained = trials[((trials.status == "FINISHED") | (tags.stopped_early != "")) & (tags.reused_from == "")]
    tag = sweep.tracker.client.get_run(sweep.parent_run_id).data.tags.get(ESTIMATE_TAG)
    cost = Estimate.from_json(tag) if tag else None
    phase = trained.stage.where(tags.cell[trained.index] == "", "search")  # a tuned cell's trials: the search
    seconds = (trained.end_time - trained.start_time) / 1000
    rows = []
    for name in [*PHASES, "search"]:
        mine = seconds[phase == name]
        estimated = cost.phases.get(name) if cost else None
        if len(mine) or estimated:
            rows.append((name, len(mine), estimated.seconds if estimated else None, float(mine.sum())))
    wall = (trained.end_time.max() - trained.start_time.min()) / 1000 if len(trained) else None
    rows.append(("all (wall time)", len(trained), cost.wall_s if cost else None, wall))
    lines = ["## Hours: estimated against actual", "",
             (f"Estimated when the sweep first started, for {cost.slots} trials at once ({cost.slots_from})."
              if cost else "No estimate was recorded when this sweep started."),
             "", "| phase | stages trained | estimated | actual | actual / estimated |", "|---|---:|---:|---:|---:|"]
    for name, count, estimated_s, actual_s in rows:
        ratio = f"{actual_s / estimated_s:.2f}" if estimated_s and actual_s is not None else "-"
        lines.append(f"| {name} | {count} | {hours(estimated_s)} | {hours(actual_s)} | {ratio} |")
    return "\n".join([*lines, ""])

