"""The search algorithm of a sweep's Tuner: it releases each stage of the plan's graph as a Tune
trial as soon as the stages it takes models from are done, on the critical path first, so there
is no barrier between levels and Tune's own concurrency limits, resources and retries apply."""

from __future__ import annotations

import pickle
from dataclasses import asdict
from typing import Any

from ray.tune.search import Searcher

from sweeps.core.plan import Stage
from sweeps.core.schedule import ReadyQueue, critical_path_order
from sweeps.run.events import STAGE_FAILED
from sweeps.run.trial import SweepContext


class StageScheduler(Searcher):
    """Suggests each stage once, as soon as all its input stages are done, on the critical path
    first. Finishes when nothing is running and nothing can start."""

    def __init__(self, stages: list[Stage], done: set[str], context: SweepContext):
        super().__init__()
        self.stages = {stage.key: stage.to_dict() for stage in stages}
        self.order = critical_path_order(stages)
        self.context = asdict(context)
        self.done, self.failed = set(done), set()
        self.trial_stage: dict[str, str] = {}
        """Tune trial id -> stage key."""
        self.ready: ReadyQueue | None = None
        """Built from the state above when first needed (also after `restore`); not saved."""

    def ready_queue(self) -> ReadyQueue:
        if self.ready is None:
            inputs = {key: list(stage["inputs"].values()) for key, stage in self.stages.items()}
            self.ready = ReadyQueue(self.order, inputs, self.done, set(self.trial_stage.values()))
        return self.ready

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        ready = self.ready_queue()
        if ready:
            key = ready.pop()
            self.trial_stage[trial_id] = key
            return {"stage": self.stages[key], "sweep": self.context}
        running = set(self.trial_stage.values()) - self.done - self.failed
        return None if running else self.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.trial_stage[trial_id]
        if error or (result or {}).get(STAGE_FAILED):
            self.failed.add(key)
            return
        if key not in self.done:
            self.ready_queue().finish(key)
        self.done.add(key)
        self.failed.discard(key)  # an errored trial resumed by `bnew sweep resume`

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump({name: value for name, value in self.__dict__.items() if name != "ready"}, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))
        self.ready = None


def trial_name(trial: Any) -> str:
    return trial.config["stage"]["roles"][0]["name"]


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial).replace('/', '_')}_{trial.trial_id}"
