"""The search algorithm of a sweep's Tuner: it releases each stage of the plan's graph as a Tune
trial as soon as the stages it takes models from are done, on the critical path first, so there
is no barrier between levels and Tune's own concurrency limits, resources and retries apply."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ray.tune.search import Searcher

from sweeps.core.plan import Stage
from sweeps.core.schedule import ReadyQueue, critical_path_order
from sweeps.run.events import STAGE_FAILED
from sweeps.run.trial import SweepContext


class StageScheduler(Searcher):
    """Suggests each stage once, as soon as all its input stages are done, on the critical path
    first. Finishes when nothing is running and nothing can start.

    Restored (`bnew sweep resume`), it suggests nothing: the restored experiment continues the
    trials it holds, and the driver runs the stages it had not started in a new Tuner, from what
    MLflow says is done. Tune saves this state and its trials in separate files and uploads them
    one by one, so a driver killed in between leaves this state older than the trials: trusting
    it would start a stage that is running again, or wait forever for one that is done."""

    def __init__(self, stages: list[Stage], done: set[str], context: SweepContext):
        super().__init__()
        self.stages = {stage.key: stage.to_dict() for stage in stages}
        self.order = critical_path_order(stages)
        self.context = asdict(context)
        self.done, self.failed = set(done), set()
        self.trial_stage: dict[str, str] = {}
        """Tune trial id -> stage key."""
        self.ready: ReadyQueue | None = None
        """Built from the state above when first needed."""
        self.restored = False

    def ready_queue(self) -> ReadyQueue:
        if self.ready is None:
            inputs = {key: list(stage["inputs"].values()) for key, stage in self.stages.items()}
            self.ready = ReadyQueue(self.order, inputs, self.done, set(self.trial_stage.values()))
        return self.ready

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.restored:
            return self.FINISHED
        ready = self.ready_queue()
        if ready:
            key = ready.pop()
            self.trial_stage[trial_id] = key
            return {"stage": self.stages[key], "sweep": self.context}
        running = set(self.trial_stage.values()) - self.done - self.failed
        return None if running else self.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self.restored:
            return  # its trials may be unknown to this state (see the class), and it suggests no more
        key = self.trial_stage[trial_id]
        if error or (result or {}).get(STAGE_FAILED):
            self.failed.add(key)
            return
        if key not in self.done:
            self.ready_queue().finish(key)
        self.done.add(key)

    def save(self, checkpoint_path: str) -> None:
        """Restored, it needs none of its state (see the class)."""

    def restore_from_dir(self, checkpoint_dir: str) -> None:
        self.restored = True


def trial_name(trial: Any) -> str:
    return trial.config["stage"]["roles"][0]["name"]


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial).replace('/', '_')}_{trial.trial_id}"
