"""Laying stages out on trial slots (sweeps/core/schedule.py): the ready-queue makespan gives
exactly what the straightforward scan of every waiting stage gives, on random stage graphs, and
the driver's searcher suggests stages in the same order."""

from __future__ import annotations

import heapq
import random

import pytest

from sweeps.core.plan import Stage
from sweeps.core.schedule import critical_path_order, makespan
from sweeps.run.stage_graph import StageScheduler
from sweeps.run.trial import SweepContext

PHASES = ("teacher", "pretrain", "quantise", "real")


def scanned_critical_path_order(stages: list[Stage]) -> list[str]:
    """The oracle's order: chain lengths by recursion, as schedule.py computed them before."""
    dependants: dict[str, list[Stage]] = {stage.key: [] for stage in stages}
    for stage in stages:
        for key in stage.inputs.values():
            if key in dependants:
                dependants[key].append(stage)
    chain: dict[str, int] = {}

    def chain_epochs(stage: Stage) -> int:
        if stage.key not in chain:
            chain[stage.key] = stage.epochs + max(map(chain_epochs, dependants[stage.key]), default=0)
        return chain[stage.key]

    return [stage.key for stage in sorted(stages, key=lambda s: (-chain_epochs(s), -s.depth))]


def scanned_makespan(stages: list[Stage], seconds: dict[str, float], slots: int) -> float:
    """The oracle: after each stage finishes, scan every waiting stage for one whose inputs are done
    (quadratic; schedule.py's makespan before the ready queue)."""
    pending = scanned_critical_path_order(stages)
    inputs = {stage.key: [key for key in stage.inputs.values() if key in seconds] for stage in stages}
    done: set[str] = set()
    running: list[tuple[float, str]] = []
    now = 0.0
    while pending or running:
        for key in [key for key in pending if all(i in done for i in inputs[key])][:max(slots, 1) - len(running)]:
            heapq.heappush(running, (now + seconds[key], key))
            pending.remove(key)
        now, key = heapq.heappop(running)
        done.add(key)
    return now


def random_stages(rng: random.Random, count: int) -> list[Stage]:
    """A random stage graph: each stage reads up to two earlier stages (sometimes the same one
    twice, sometimes one outside the graph, already done), with few distinct epochs so that chains
    tie and the depth decides; listed in a shuffled order, not inputs first."""
    keys = [f"{index:04x}" for index in range(count)]
    stages = []
    for index, key in enumerate(keys):
        inputs = {}
        for field_name in ("teacher_checkpoint", "init_checkpoint"):
            if index and rng.random() < 0.6:
                inputs[field_name] = keys[rng.randrange(max(0, index - 20), index)]
            elif rng.random() < 0.1:
                inputs[field_name] = "done-elsewhere"
        stages.append(Stage(key=key, phase=rng.choice(PHASES), config={"epochs": rng.choice((1, 2, 5))},
                            inputs=inputs))
    rng.shuffle(stages)
    return stages


@pytest.mark.parametrize("seed", range(12))
def test_the_ready_queue_lays_stages_out_as_the_scan_does(seed: int) -> None:
    rng = random.Random(seed)
    stages = random_stages(rng, rng.randrange(150, 400))
    # Whole seconds: stages end at the same time, and the end's tie-break by key must match too.
    seconds = {stage.key: float(rng.randrange(1, 6)) if seed % 2 else rng.uniform(0.5, 100.0) for stage in stages}
    assert critical_path_order(stages) == scanned_critical_path_order(stages)
    for slots in (0, 1, 2, rng.randrange(3, 9), rng.randrange(9, 40), len(stages)):
        assert makespan(stages, seconds, slots) == scanned_makespan(stages, seconds, slots), slots


def test_a_chain_longer_than_the_recursion_limit_is_ordered_inputs_first() -> None:
    """A chain of 5,000 stages (each reading the one before): the first starts first, and one slot or
    many, they take as long as all of them one after another."""
    stages = [Stage(key=f"s{index}", phase="quantise", config={"epochs": 1},
                    inputs={"init_checkpoint": f"s{index - 1}"} if index else {}) for index in range(5000)]
    assert critical_path_order(stages[::-1]) == [f"s{index}" for index in range(5000)]
    seconds = {stage.key: 2.0 for stage in stages}
    assert makespan(stages, seconds, 1) == makespan(stages, seconds, 64) == 10_000.0


@pytest.mark.parametrize("seed", range(6))
def test_the_sweeps_searcher_suggests_stages_as_the_scan_does(seed: int) -> None:
    """`StageScheduler` (the driver's Tune searcher) on a random graph, trials ending in a random
    order, some failing: each suggestion is the first stage in critical-path order that has not
    started and whose inputs are done, as the scan over every stage gave it; then FINISHED."""
    rng = random.Random(seed)
    stages = random_stages(rng, rng.randrange(100, 250))
    scheduler = StageScheduler(stages, {"done-elsewhere"}, SweepContext("random", "sqlite:///x", "1", "p"))
    order, inputs = scanned_critical_path_order(stages), {stage.key: list(stage.inputs.values()) for stage in stages}
    done, failed, started, running = {"done-elsewhere"}, set(), set(), []
    for step in range(10 * len(stages)):
        expected = next((key for key in order if key not in started and all(i in done for i in inputs[key])), None)
        suggested = scheduler.suggest(f"t{step}")
        if expected is None:
            assert suggested == (None if running else scheduler.FINISHED)
            if not running:
                break
            trial, key = running.pop(rng.randrange(len(running)))
            fails = rng.random() < 0.05
            (failed if fails else done).add(key)
            scheduler.on_trial_complete(trial, error=fails)
            continue
        assert suggested["stage"]["key"] == expected
        started.add(expected)
        running.append((f"t{step}", expected))
    assert suggested == scheduler.FINISHED and done | failed == {"done-elsewhere"} | started


def test_a_restored_searcher_only_lets_tune_finish_the_trials_it_restored(tmp_path) -> None:
    """`bnew sweep resume`: Tune uploads the searcher's state apart from its trials, so the state it
    restores may predate a trial it restores (a driver killed mid-upload: the S3 test once got a
    quantise trial its searcher had never suggested, and a KeyError). Restored, the searcher accepts
    the completion of any trial and suggests nothing; the driver starts what is left in a new Tuner."""
    stages = [Stage(key="pretrain", phase="pretrain", config={"epochs": 2}),
              Stage(key="quantise", phase="quantise", config={"epochs": 2}, inputs={"init_checkpoint": "pretrain"})]
    context = SweepContext("resumed", "sqlite:///x", "1", "p")
    scheduler = StageScheduler(stages, set(), context)
    assert scheduler.suggest("t0")["stage"]["key"] == "pretrain"
    scheduler.save_to_dir(str(tmp_path), "before-quantise")
    scheduler.on_trial_complete("t0", {"config/stage/key": "pretrain"})
    assert scheduler.suggest("t1")["stage"]["key"] == "quantise"

    restored = StageScheduler(stages, set(), context)
    restored.restore_from_dir(str(tmp_path))
    restored.on_trial_complete("t1", {"config/stage/key": "quantise"})
    restored.on_trial_complete("t2", error=True)
    assert restored.suggest("t3") == restored.FINISHED
