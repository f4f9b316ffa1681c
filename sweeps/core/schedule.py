"""The order a sweep starts its stages in, and how long that takes on a number of trial slots.

The stage graph's searcher (`sweeps.run.stage_graph`) starts each stage once its inputs are done,
on the critical path first; the cost estimate (`sweeps.analysis.cost`) lays the same stages out
the same way to tell the wall time before the sweep runs."""

from __future__ import annotations

import heapq

from sweeps.core.plan import Stage


def stage_dependants(stages: list[Stage]) -> dict[str, list[str]]:
    """Stage key -> the keys of the stages among `stages` that read it, once per input that does
    (inputs outside `stages` are done already)."""
    dependants: dict[str, list[str]] = {stage.key: [] for stage in stages}
    for stage in stages:
        for key in stage.inputs.values():
            if key in dependants:
                dependants[key].append(stage.key)
    return dependants


def input_counts(dependants: dict[str, list[str]]) -> dict[str, int]:
    """Stage key -> how many of its inputs are among the stages (an input read twice counts twice)."""
    counts = dict.fromkeys(dependants, 0)
    for readers in dependants.values():
        for key in readers:
            counts[key] += 1
    return counts


def inputs_first(dependants: dict[str, list[str]]) -> list[str]:
    """Stage keys, every stage after its inputs (Kahn's topological order): a loop, not recursion,
    so that a graph of 100,000 stages is laid out without a deep call stack."""
    waiting_on = input_counts(dependants)
    order = [key for key, count in waiting_on.items() if not count]
    for key in order:  # grows while it is read
        for reader in dependants[key]:
            waiting_on[reader] -= 1
            if not waiting_on[reader]:
                order.append(reader)
    return order


def critical_path_order(stages: list[Stage]) -> list[str]:
    """Stage keys, the longest chain of epochs from the stage to the end of the sweep first (then
    the deepest): list scheduling on the critical path. A teacher that distilled trials wait for
    starts before independent trials, which fill the free slots later; deepest-first alone left
    the teachers of cifar10-cpu-study to the end, with their dependants after them."""
    by_key = {stage.key: stage for stage in stages}
    dependants = stage_dependants(stages)
    chain: dict[str, int] = {}
    for key in reversed(inputs_first(dependants)):  # a stage's dependants before it
        chain[key] = by_key[key].epochs + max((chain[reader] for reader in dependants[key]), default=0)
    return [stage.key for stage in sorted(stages, key=lambda s: (-chain[s.key], -s.depth))]


class ReadyQueue:
    """The stages whose inputs are done and that have not started, on the critical path first:
    `pop()` the next to start, `finish(key)` when one is done (each stage whose last unfinished
    input it was joins the queue). O(log n) a stage, where scanning every waiting stage after each
    one finishes made a sweep of n stages O(n^2). An input that is neither done nor among the
    stages never finishes: its readers never start."""

    def __init__(self, order: list[str], inputs: dict[str, list[str]], done: set[str],
                 started: set[str] = frozenset()):
        self.order = order
        self.readers: dict[str, list[str]] = {}
        self.waiting_on: dict[str, int] = {}
        for key in order:
            unfinished = [key_in for key_in in inputs[key] if key_in not in done]  # an input read twice counts twice
            self.waiting_on[key] = len(unfinished)
            for key_in in unfinished:
                self.readers.setdefault(key_in, []).append(key)
        self.position = {key: index for index, key in enumerate(order)}
        self.heap = [index for index, key in enumerate(order) if not self.waiting_on[key] and key not in started]

    def __bool__(self) -> bool:
        return bool(self.heap)

    def pop(self) -> str:
        return self.order[heapq.heappop(self.heap)]

    def finish(self, key: str) -> None:
        for reader in self.readers.pop(key, []):
            self.waiting_on[reader] -= 1
            if not self.waiting_on[reader]:
                heapq.heappush(self.heap, self.position[reader])


def makespan(stages: list[Stage], seconds: dict[str, float], slots: int) -> float:
    """Wall seconds to train `stages` (their inputs outside `stages` are done) taking `seconds[key]`
    each, on `slots` trials at once: each starts as soon as its inputs are done and a slot is free,
    on the critical path first, as the driver starts them (`ReadyQueue`, as the driver's searcher)."""
    ready = ReadyQueue(critical_path_order(stages),
                       {stage.key: [key for key in stage.inputs.values() if key in seconds] for stage in stages}, set())
    running: list[tuple[float, str]] = []  # (end, key), earliest end first
    now = 0.0
    while ready or running:
        while ready and len(running) < max(slots, 1):
            key = ready.pop()
            heapq.heappush(running, (now + seconds[key], key))
        now, key = heapq.heappop(running)
        ready.finish(key)
    return now
