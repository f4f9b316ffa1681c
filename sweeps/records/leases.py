"""Stage leases: a trial about to train a stage claims it in MLflow first, so sweeps that share a
stage (concurrent sweeps, several drivers) train it once.

A lease is an MLflow experiment named `bnew-lease-<stage key>`. MLflow's stores keep experiment
names unique (a UNIQUE constraint in the SQL stores, behind the tracking server too), so
`create_experiment` is an atomic claim: of two drivers that race for a stage, exactly one
creates the experiment and the other gets RESOURCE_ALREADY_EXISTS, whatever their clocks say.
The holder tags the lease with its sweep, its run and a heartbeat it renews every
`HEARTBEAT_S`; it releases the lease when its attempt ends (finished, failed or stopped) by
renaming the experiment out of the way (which frees the name) and deleting it.

Staleness is observed, never computed from two machines' clocks: a waiter that has seen the same
heartbeat value for `LEASE_TIMEOUT_S` on its own monotonic clock takes the lease as its dead
holder's, renames it aside and claims the name again; the same uniqueness lets only one waiter
win. Renaming a lease another waiter renamed already does no harm: it only moves a name that is free.

A holder cannot rely on being alive to the others, so it checks:
- `renewal_age()`: a holder that could not renew for the timeout (MLflow unreachable, or the
  holder paused) asks whether it still holds the stage: if so it renews and trains on, else, or
  if MLflow cannot say, it stops training the stage (`LeaseGuard` raises `LeaseLost`); its
  trial's retry resumes from its checkpoint, or links the run of the trial that took it over.
- `still_held()` (fencing): the lease's experiment id is the claim's token. A holder paused past
  the timeout (SIGSTOP, a frozen VM) finds on waking that the name now belongs to another claim;
  before its run becomes the stage's result it checks, and if it lost the stage it records
  nothing as the result (`sweeps.run.trial` marks its run superseded and links the taker's)."""

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

from bnew_core.callbacks import Callback
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
    heartbeat: str
    """Changes at each renewal; only whether it changed matters, not what it says."""
    experiment_id: str
    """The lease's experiment: one per claim, the claim's fencing token."""


class LeaseLost(RuntimeError):
    """This trial no longer holds its stage's lease (it could not renew it). A RuntimeError, not
    a `BnewError`: Tune retries the trial, which claims the stage again or waits for its taker."""


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
        self.renewed = time.monotonic()
        """When this holder last renewed its lease (or claimed it), on its own monotonic clock."""
        self.taken_over: Holder | None = None
        """The dead holder whose lease this trial moved aside, if it did."""
        self.seen: tuple[str, str] | None = None
        self.seen_since = 0.0
        """The holder's (lease, heartbeat) this trial last saw, and since when (its monotonic clock)."""

    def claim(self) -> Holder | None:
        """Claim the stage: None once this trial holds it (its heartbeat then runs), else the live
        holder. A stale holder's lease is moved aside and the stage claimed again."""
        while True:
            tags = {SWEEP_TAG: self.sweep, RUN_TAG: self.run_id, HEARTBEAT_TAG: "0"}
            try:
                self.experiment_id = self.tracker.client.create_experiment(self.name, tags=tags)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                holder = self.holder()
                if holder is None:
                    continue  # released between our two calls
                if holder.run_id != self.run_id and self.unchanged_for(holder) <= LEASE_TIMEOUT_S:
                    return holder
                # A dead holder, or this run's own earlier attempt (its process was lost): free the name.
                self.move_aside(holder, "expired")
                self.taken_over = holder
                continue
            self.renewed, self.stop_heartbeat = time.monotonic(), threading.Event()
            threading.Thread(target=self.beat, args=(self.experiment_id, self.stop_heartbeat),
                             name=f"lease {self.name}", daemon=True).start()
            return None

    def unchanged_for(self, holder: Holder) -> float:
        """Seconds this trial has seen `holder`'s heartbeat unchanged, on its own monotonic clock."""
        observed = (holder.experiment_id, holder.heartbeat)
        if observed != self.seen:
            self.seen, self.seen_since = observed, time.monotonic()
        return time.monotonic() - self.seen_since

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
        return Holder(tags.get(SWEEP_TAG, "?"), tags.get(RUN_TAG, ""), tags.get(HEARTBEAT_TAG, ""),
                      experiment.experiment_id)

    def still_held(self) -> bool:
        """Whether the stage's lease is still this trial's claim (fencing: ask right before the
        run becomes the stage's result). Raises if MLflow cannot say. A claim found lost is
        forgotten: its heartbeat stops, and `release()` leaves the taker's lease alone."""
        holder = self.holder()
        held = self.experiment_id is not None and holder is not None and holder.experiment_id == self.experiment_id
        if not held:
            self.end_claim()
        return held

    def renewal_age(self) -> float:
        """Seconds since this holder last renewed its lease, on its own monotonic clock."""
        return time.monotonic() - self.renewed

    def move_aside(self, holder: Holder, why: str) -> None:
        """Free the lease's name (another claim can then create it) and delete the old lease."""
        experiment = self.tracker.client.get_experiment_by_name(self.name)
        if experiment is None or experiment.experiment_id != holder.experiment_id:
            return  # moved aside already, or claimed anew
        self.retire(experiment.experiment_id, why)

    def retire(self, experiment_id: str, why: str) -> None:
        """Rename the lease's experiment out of the way (which frees the name) and delete it; a
        lease another trial moved aside first is left as it is (MLflow refuses to rename a
        deleted experiment)."""
        with contextlib.suppress(MlflowException):
            self.tracker.client.rename_experiment(experiment_id, f"{self.name}-{why}-{uuid.uuid4().hex[:8]}")
            self.tracker.client.delete_experiment(experiment_id)

    def beat(self, experiment_id: str, stop: threading.Event) -> None:
        """Renew the claim `experiment_id` until `stop` is set (each claim has its own)."""
        while not stop.wait(HEARTBEAT_S):
            # Any failure is a renewal missed, whatever its cause: `LeaseGuard` stops the training
            # once they have gone on for the timeout.
            with contextlib.suppress(Exception):
                self.renew(experiment_id)

    def renew(self, experiment_id: str) -> None:
        self.tracker.client.set_experiment_tag(experiment_id, HEARTBEAT_TAG, uuid.uuid4().hex[:8])
        self.renewed = time.monotonic()

    def renew_if_held(self) -> bool:
        """Renew now if this trial still holds the stage, else False. Raises if MLflow cannot say."""
        if not self.still_held():
            return False
        self.renew(self.experiment_id)
        return True

    def end_claim(self) -> str | None:
        """Stop renewing this trial's claim and forget it; its experiment id, if it had one."""
        self.stop_heartbeat.set()
        experiment_id, self.experiment_id = self.experiment_id, None
        return experiment_id

    def release(self) -> None:
        """End this trial's hold, whatever became of its attempt. A claim that `still_held()` found
        lost was forgotten then: the lease is its taker's, and MLflow would refuse (HTTP 500, an
        ERROR in the server's log) to rename the experiment the taker deleted."""
        experiment_id = self.end_claim()
        if experiment_id is not None:
            self.retire(experiment_id, "released")  # by its id: no need to read it first


class LeaseGuard(Callback):
    """Stops the training (`LeaseLost`) once its holder has not renewed the stage's lease for
    `LEASE_TIMEOUT_S` and either a waiter took it over (whose run then is the stage's) or MLflow
    cannot say. A holder paused or cut off that long whose lease nobody took renews it and goes
    on: a retry would only train again what it has."""

    def __init__(self, lease: Lease):
        self.lease = lease

    def on_batch_end(self, epoch: int, batch: int, batches_per_epoch: int) -> None:
        age = self.lease.renewal_age()
        if age <= LEASE_TIMEOUT_S:
            return
        try:
            if self.lease.renew_if_held():
                return
            why, then = "another trial took it over", "the sweep goes on with that trial's run"
        except (MlflowException, OSError):  # MLflow's client wraps an unreachable server in one of these
            why, then = "MLflow unreachable?", "the retry resumes from its checkpoint"
        raise LeaseLost(f"could not renew the lease of stage {self.lease.key} for {age:.0f} s ({why}): "
                        f"stopped training it; {then}")
