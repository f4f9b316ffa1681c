"""Stage leases: a trial about to train a stage claims it in MLflow first, so sweeps that share a
stage (concurrent sweeps, several drivers) train it once.

A lease is an MLflow experiment named `bnew-lease-<stage key>`. MLflow's stores keep experiment
names unique (a UNIQUE constraint in the SQL stores, behind the tracking server too), so
`create_experiment` is an atomic claim: of two drivers that race for a stage, exactly one
creates the experiment and the other gets RESOURCE_ALREADY_EXISTS, whatever their clocks say.
The holder tags the lease with its sweep, its run and a heartbeat it renews every
`HEARTBEAT_S`; it releases the lease when its attempt ends (finished, failed or stopped) by
renaming the experiment out of the way (which frees the name) and deleting it. A lease whose
heartbeat is older than `LEASE_TIMEOUT_S` belongs to a dead driver or node: a waiter renames it
aside and claims the name again, and the same uniqueness lets only one waiter win. Renaming a
stale lease that another waiter renamed already does no harm: it only moves a name that is free.

Why this is safe: only the creator of the name trains, and a name is freed only by its holder,
or once the holder stopped renewing for longer than the timeout, far longer than a heartbeat
interval, so no two live trials hold a stage at once."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from bnew_core.config import BnewError
from sweeps.core.schema import ERROR_TAG, FINAL_FAILURE_TAG
from sweeps.records.tracker import Tracker

LEASE_PREFIX = "bnew-lease-"
HEARTBEAT_S = float(os.environ.get("BNEW_LEASE_HEARTBEAT_S", "20"))
"""How often a holder renews its lease."""
LEASE_TIMEOUT_S = float(os.environ.get("BNEW_LEASE_TIMEOUT_S", "300"))
"""A lease not renewed for this long is taken over (its driver or node is gone)."""
POLL_S = float(os.environ.get("BNEW_LEASE_POLL_S", "5"))
"""How often a waiting trial looks whether the stage is finished or its lease free."""
SWEEP_TAG, RUN_TAG, HEARTBEAT_TAG = "bnew.lease.sweep", "bnew.lease.run", "bnew.lease.heartbeat"


@dataclass(frozen=True)
class Holder:
    """Who holds a stage's lease."""

    sweep: str
    run_id: str
    heartbeat_ms: int

    def is_stale(self, now_ms: int) -> bool:
        return now_ms - self.heartbeat_ms > LEASE_TIMEOUT_S * 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Held:
    """What `Lease.hold` came back with."""

    finished: Run | None = None
    """The run that trained the stage while this trial waited (link it, train nothing)."""
    previous: str | None = None
    """Else this trial holds the stage: the run that held it before, unfinished (continue from its checkpoint)."""


class Lease:
    """The lease of one stage, as one trial sees it: `claim()` until it holds it, `release()` after."""

    def __init__(self, tracker: Tracker, stage_key: str, sweep: str, run_id: str):
        self.tracker, self.key, self.name = tracker, stage_key, f"{LEASE_PREFIX}{stage_key}"
        self.sweep, self.run_id = sweep, run_id
        self.experiment_id: str | None = None
        self.stop_heartbeat = threading.Event()
        self.taken_over: Holder | None = None
        """The dead holder whose lease this trial moved aside, if it did."""

    def claim(self) -> Holder | None:
        """Claim the stage: None once this trial holds it (its heartbeat then runs), else the live
        holder. A stale holder's lease is moved aside and the stage claimed again."""
        while True:
            tags = {SWEEP_TAG: self.sweep, RUN_TAG: self.run_id, HEARTBEAT_TAG: str(now_ms())}
            try:
                self.experiment_id = self.tracker.client.create_experiment(self.name, tags=tags)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                holder = self.holder()
                if holder is None:
                    continue  # released between our two calls
                if not holder.is_stale(now_ms()) and holder.run_id != self.run_id:
                    return holder
                # A dead holder, or this run's own earlier attempt (its process was lost): free the name.
                self.move_aside(holder, "expired")
                self.taken_over = holder
                continue
            threading.Thread(target=self.beat, name=f"lease {self.name}", daemon=True).start()
            return None

    def hold(self, on_wait: Callable[[Holder], None]) -> Held:
        """Wait until the stage is finished (by another sweep) or this trial holds it, calling
        `on_wait` once per holder it waits for. A holder whose stage failed for good (a
        `BnewError`: bad input, divergence) fails this trial too, with its reason."""
        waited: Holder | None = None
        while (holder := self.claim()) is not None:
            if waited is None or holder.run_id != waited.run_id:
                on_wait(holder)
                waited = holder
            time.sleep(POLL_S)
            finished = self.tracker.finished_stages([self.key]).get(self.key)
            if finished is not None:  # its holder finished while we waited
                return Held(finished=finished)
        # Claimed first, looked second: a holder that finished and released just before our claim
        # is found here, and a trial with no rival pays one lookup, not two.
        finished = self.tracker.finished_stages([self.key]).get(self.key)
        if finished is not None:
            self.release()
            return Held(finished=finished)
        waited = self.taken_over or waited
        if waited is not None and waited.run_id != self.run_id:
            run = self.tracker.client.get_run(waited.run_id)
            if run.info.status == "FAILED" and FINAL_FAILURE_TAG in run.data.tags:
                self.release()
                raise BnewError(f"stage failed in sweep {waited.sweep} (run {waited.run_id}): "
                                f"{run.data.tags.get(ERROR_TAG, 'no reason recorded')}")
        return Held(previous=waited.run_id if waited and waited.run_id != self.run_id else None)

    def holder(self) -> Holder | None:
        experiment = self.tracker.client.get_experiment_by_name(self.name)
        if experiment is None or experiment.lifecycle_stage != "active":
            return None
        tags = experiment.tags
        return Holder(tags.get(SWEEP_TAG, "?"), tags.get(RUN_TAG, ""), int(tags.get(HEARTBEAT_TAG, "0")))

    def move_aside(self, holder: Holder, why: str) -> None:
        """Free the lease's name (another claim can then create it) and delete the old lease."""
        experiment = self.tracker.client.get_experiment_by_name(self.name)
        if experiment is None or experiment.tags.get(RUN_TAG) != holder.run_id:
            return  # moved aside already, or claimed anew by a live trial
        with contextlib.suppress(MlflowException):  # another waiter moved it first
            self.tracker.client.rename_experiment(experiment.experiment_id, f"{self.name}-{why}-{uuid.uuid4().hex[:8]}")
            self.tracker.client.delete_experiment(experiment.experiment_id)

    def beat(self) -> None:
        while not self.stop_heartbeat.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # MLflow down a while: the timeout is far longer than a beat
                self.tracker.client.set_experiment_tag(self.experiment_id, HEARTBEAT_TAG, str(now_ms()))

    def release(self) -> None:
        """End this trial's hold, whatever became of its attempt."""
        if self.experiment_id is None:
            return
        self.stop_heartbeat.set()
        self.move_aside(Holder(self.sweep, self.run_id, 0), "released")
        self.experiment_id = None
