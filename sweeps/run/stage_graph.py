"""The search algorithm of a sweep's Tuner: it releases each stage of the plan's graph as a Tune
trial as soon as the stages it takes models from are done, on the critical path first, so there
is no barrier between levels and Tune's own concurrency limits, resources and retries apply."""

from __future__ import annotations

import pickle
from dataclasses import asdict
from typing import Any

from ray.tune.search import Searcher

from sweeps.core.plan import Stage
from sweeps.core.schedule import critical_path_order
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

    def ready(self) -> list[str]:
        submitted = set(self.trial_stage.values())
        return [
            key for key in self.order
            if key not in submitted and all(i in self.done for i in self.stages[key]["inputs"].values())
        ]

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        ready = self.ready()
        if ready:
            self.trial_stage[trial_id] = ready[0]
            return {"stage": self.stages[ready[0]], "sweep": self.context}
        running = set(self.trial_stage.values()) - self.done - self.failed
        return None if running else self.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.trial_stage[trial_id]
        if error or (result or {}).get(STAGE_FAILED):
            self.failed.add(key)
        else:
            self.done.add(key)
            self.failed.discard(key)  # an errored trial resumed by `bnew sweep resume`

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def trial_name(trial: Any) -> str:
    return trial.config["stage"]["roles"][0]["name"]


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial).replace('/', '_')}_{trial.trial_id}"
