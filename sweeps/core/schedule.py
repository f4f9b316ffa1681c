"""The order a sweep starts its stages in, and how long that takes on a number of trial slots.

The stage graph's searcher (`sweeps.run.stage_graph`) starts each stage once its inputs are done,
on the critical path first; the cost estimate (`sweeps.analysis.cost`) lays the same stages out
the same way to tell the wall time before the sweep runs."""

from __future__ import annotations

import heapq

from sweeps.core.plan import Stage


def critical_path_order(stages: list[Stage]) -> list[str]:
    """Stage keys, the longest chain of epochs from the stage to the end of the sweep first (then
    the deepest): list scheduling on the critical path. A teacher that distilled trials wait for
    starts before independent trials, which fill the free slots later; deepest-first alone left
    the teachers of cifar10-cpu-study to the end, with their dependants after them."""
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


def makespan(stages: list[Stage], seconds: dict[str, float], slots: int) -> float:
    """Wall seconds to train `stages` (their inputs outside `stages` are done) taking `seconds[key]`
    each, on `slots` trials at once: each starts as soon as its inputs are done and a slot is free,
    on the critical path first, as the driver starts them."""
    pending = critical_path_order(stages)
    inputs = {stage.key: [key for key in stage.inputs.values() if key in seconds] for stage in stages}
    done: set[str] = set()
    running: list[tuple[float, str]] = []  # (end, key), earliest end first
    now = 0.0
    while pending or running:
        for key in [key for key in pending if all(i in done for i in inputs[key])][:max(slots, 1) - len(running)]:
            heapq.heappush(running, (now + seconds[key], key))
            pending.remove(key)
        now, key = heapq.heappop(running)
        done.add(key)
    return now
