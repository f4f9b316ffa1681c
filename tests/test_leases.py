"""Stage leases (`sweeps/records/leases.py`): sweeps that share a stage train it once. On a real
MLflow store: racing claims, a stale holder taken over, a release; then real sweeps, each with
its own driver and local Ray, logging to one `mlflow server`: two at once sharing their
pretrained model, the leading driver killed mid-stage, and a shared stage that fails for good."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from mlflow import MlflowClient

from bnew_core.config import BnewError
from sweeps.records import leases
from sweeps.records.leases import HEARTBEAT_TAG, Lease
from sweeps.records.tracker import Tracker
from servers import descendants, mlflow_server, process_table

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tracker:
    monkeypatch.setattr(leases, "POLL_S", 0.2)
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db")


def test_of_racing_claims_exactly_one_holds_the_stage(tracker: Tracker) -> None:
    for attempt in range(10):
        claims = [Lease(tracker, f"key{attempt}", sweep, f"run-{sweep}") for sweep in ("a", "b", "c")]
        start, outcomes = threading.Barrier(len(claims)), {}

        def claim(lease: Lease) -> None:
            start.wait()
            outcomes[lease.sweep] = lease.claim()

        threads = [threading.Thread(target=claim, args=(lease,)) for lease in claims]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners = [sweep for sweep, holder in outcomes.items() if holder is None]
        assert len(winners) == 1
        assert {holder.sweep for holder in outcomes.values() if holder is not None} == set(winners)
        for lease in claims:
            lease.release()
        assert tracker.client.get_experiment_by_name(f"{leases.LEASE_PREFIX}key{attempt}") is None


def poll_until_taken_over(waiter: Lease, timeout: float, poll: float) -> tuple[float, int]:
    """Claim every `poll` seconds until `waiter` holds the lease: then how long it had seen the
    last heartbeat unchanged, and how many polls kept the holder though they began with that
    heartbeat unchanged past `timeout` (each had to take over)."""
    started, late_polls = time.monotonic(), 0
    while True:
        observed, unchanged = waiter.seen, time.monotonic() - waiter.seen_since
        if waiter.claim() is None:
            return time.monotonic() - waiter.seen_since, late_polls
        late_polls += waiter.seen == observed and unchanged > timeout
        assert time.monotonic() - started < 300, "the lease was never taken over"  # a hang, not a timing
        time.sleep(poll)


def test_a_lease_is_stale_once_its_heartbeat_stays_unchanged_for_the_timeout(tracker: Tracker, monkeypatch) -> None:
    """Staleness by observation: whatever time the heartbeat says, a waiter takes the lease over
    only after seeing it unchanged for LEASE_TIMEOUT_S on its own monotonic clock."""
    timeout = 2.0  # twenty missed heartbeats
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(leases, "LEASE_TIMEOUT_S", timeout)
    first, second = Lease(tracker, "k", "a", "run-a"), Lease(tracker, "k", "b", "run-b")
    assert first.claim() is None
    tracker.client.set_experiment_tag(first.experiment_id, HEARTBEAT_TAG, "0")  # a time from 1970: not a reason
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:  # renewed every 0.1 s: never taken over
        assert second.claim().run_id == "run-a"
        time.sleep(0.2)
    first.stop_heartbeat.set()  # its driver dies: the heartbeat stops changing
    time.sleep(0.2)  # a beat in flight lands
    third = Lease(tracker, "k", "c", "run-c")  # a waiter that starts looking now
    looking_since = time.monotonic()
    unchanged, late_polls = poll_until_taken_over(third, timeout, poll=0.1)
    assert unchanged >= timeout and time.monotonic() - looking_since >= timeout and late_polls == 0
    assert third.holder().run_id == "run-c" and third.taken_over.run_id == "run-a"


HOLDER = """
import sys, threading, time
from sweeps.records.leases import Lease
from sweeps.records.tracker import Tracker
lease = Lease(Tracker(sys.argv[1]), "shifted", "holder", "run-holder")
assert lease.claim() is None
print(time.time(), flush=True)  # its clock, to show that it is shifted
threading.Event().wait()  # renews until killed (no time.sleep: libfaketime 0.9.10 fails it with EINVAL)
"""


@pytest.mark.debian("faketime")
@pytest.mark.parametrize("shift", ["+1h", "-1h"])
def test_a_holder_whose_clock_is_an_hour_off_keeps_its_lease_while_it_renews(tmp_path: Path, shift: str) -> None:
    """The holder runs under libfaketime, its clock an hour ahead or behind the waiter's: while it
    renews, it is never taken over (comparing clocks took a lagging holder's lease at once, and
    never a leading dead one's); once it dies, the waiter takes it over on its first poll after the
    last heartbeat it saw has stayed unchanged for the timeout, on its own clock. Both bounds are
    on that observation, not on when the test killed the holder: on a loaded machine the holder's
    last beats come late, so the waiter may have seen the last one well before the kill."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    waiter = Lease(Tracker(uri), "shifted", "waiter", "run-waiter")
    # Only the wall clock is shifted, as between two machines; each has its own monotonic clock.
    # MLflow's telemetry thread calls time.sleep, which fails under libfaketime: it is off.
    env = {**os.environ, "BNEW_LEASE_HEARTBEAT_S": "0.5", "PYTHONPATH": str(REPO),
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    holder = subprocess.Popen(["faketime", "-f", shift, sys.executable, "-c", HOLDER, uri], env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    kill_holder = lambda: (os.killpg(holder.pid, signal.SIGKILL), holder.wait())  # faketime runs it as a child
    try:
        holder_clock = float(holder.stdout.readline() or "nan")
        assert abs(abs(holder_clock - time.time()) - 3600) < 120, holder_clock  # the shift is real
        timeout, poll = 5.0, 0.5  # ten missed heartbeats
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(leases, "LEASE_TIMEOUT_S", timeout)
            renewing_until = time.monotonic() + 2 * timeout
            while time.monotonic() < renewing_until:
                assert waiter.claim().run_id == "run-holder"
                time.sleep(poll)
            kill_holder()
            unchanged, late_polls = poll_until_taken_over(waiter, timeout, poll)
        assert unchanged >= timeout and late_polls == 0, (unchanged, late_polls)
        assert waiter.holder().run_id == "run-waiter"
    finally:
        with contextlib.suppress(ProcessLookupError):
            kill_holder()


def test_a_holder_that_lost_its_lease_is_fenced(tmp_path: Path, server: str) -> None:
    """The claim's experiment id is its token: once another trial has taken the stage over, the old
    holder no longer holds it, and releasing neither frees the taker's lease nor asks the real
    server anything it refuses (renaming the experiment the taker deleted: an HTTP 500, and an
    ERROR line in the server's log, from every fenced trial)."""
    tracker = Tracker(server)
    first, second = Lease(tracker, "k", "a", "run-a"), Lease(tracker, "k", "b", "run-b")
    assert first.claim() is None and first.still_held()
    first.stop_heartbeat.set()
    second.move_aside(second.holder(), "expired")  # as a waiter does once the heartbeat stayed unchanged
    assert second.claim() is None
    assert not first.still_held() and second.still_held()
    first.release()
    assert second.still_held() and second.holder().run_id == "run-b"
    log = (tmp_path / "server.log").read_text()
    assert "experiments/update" in log, log[-3000:]  # the move aside: the log shows the renames it got
    assert " 500 " not in log and "ERROR" not in log, log[-3000:]


def test_a_holder_past_the_timeout_trains_on_only_while_it_holds_the_stage(tracker: Tracker, monkeypatch) -> None:
    """A holder that has not renewed for the timeout (paused, or MLflow was away) asks before it
    trains on: while nobody took the stage, it renews and goes on (stopping would only make its
    retry train again what it has); once another trial has, it stops. MLflow unreachable:
    tests/test_tracking_outage.py."""
    monkeypatch.setattr(leases, "LEASE_TIMEOUT_S", 5.0)
    lease = Lease(tracker, "k", "a", "run-a")
    assert lease.claim() is None
    lease.stop_heartbeat.set()  # only the guard renews below
    guard = leases.LeaseGuard(lease)
    guard.on_batch_end(0, 0, 10)  # renewed just now
    before = lease.holder().heartbeat
    lease.renewed -= 6.0  # as after a 6 s pause
    guard.on_batch_end(0, 1, 10)
    assert lease.renewal_age() < 5.0 and lease.holder().heartbeat != before  # renewed: a waiter sees it live
    lease.renewed -= 6.0
    taker = Lease(tracker, "k", "b", "run-b")
    taker.move_aside(taker.holder(), "expired")  # as a waiter does once the heartbeat stayed unchanged
    assert taker.claim() is None
    with pytest.raises(leases.LeaseLost, match=r"could not renew the lease of stage k for 6 s \(another trial took it over\)"):
        guard.on_batch_end(0, 2, 10)


def test_a_waiting_trial_links_the_run_that_finished_its_stage(tracker: Tracker) -> None:
    experiment_id = tracker.experiment_id("other")
    holder = Lease(tracker, "shared", "other", "placeholder")
    assert holder.claim() is None

    waits: list[str] = []
    waiting = threading.Event()

    def finish_elsewhere() -> None:
        assert waiting.wait(300)  # once the trial below waits for it
        run = tracker.client.create_run(experiment_id, tags={"bnew.stage_key": "shared", "bnew.role": "trial"})
        tracker.client.set_terminated(run.info.run_id, "FINISHED")
        holder.release()

    threading.Thread(target=finish_elsewhere).start()
    held = Lease(tracker, "shared", "mine", "run-mine").hold(lambda h: (waits.append(h.sweep), waiting.set()))
    assert held.finished is not None and held.finished.info.experiment_id == experiment_id
    assert waits == ["other"]


def test_a_stage_that_failed_for_good_fails_the_waiting_trial_with_its_reason(tracker: Tracker) -> None:
    run_id = tracker.client.create_run(tracker.experiment_id("other"), tags={"bnew.stage_key": "bad"}).info.run_id
    holder = Lease(tracker, "bad", "other", run_id)
    assert holder.claim() is None

    waiting = threading.Event()

    def fail_for_good() -> None:
        assert waiting.wait(300)  # once the trial below waits for it
        tracker.fail_trial(run_id, "BnewError: diverged", final=True)
        holder.release()

    threading.Thread(target=fail_for_good).start()
    with pytest.raises(BnewError, match=f"stage failed in sweep other \\(run {run_id}\\): BnewError: diverged"):
        Lease(tracker, "bad", "mine", "run-mine").hold(lambda h: waiting.set())


# --- real sweeps, one driver each --------------------------------------------------------------------
def spec(name: str, optimiser: str, pretrain_epochs: int) -> dict:
    """A digits sweep whose one pretrained model the sweeps below share (same settings, same key)."""
    return {"name": name, "axes": {"dataset": ["digits"], "optimiser": [optimiser], "seed": [0], "budget": [2]},
            "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": pretrain_epochs}},
            "checkpoint": {"every_epochs": 1}, "max_failures": 0, "resources": {"cpu": 1}}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    with mlflow_server(tmp_path) as url:
        yield url


def driver(tmp_path: Path, server: str, sweep: dict, command: str = "run", **env: str) -> subprocess.Popen:
    """`bnew sweep run` (or `command`) of `sweep` on its own local Ray, logging to `server`."""
    path = tmp_path / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    variables = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BNEW_SWEEP_FAULT")},
                 "MLFLOW_TRACKING_URI": server, "BNEW_PROJECT_DIR": str(tmp_path), "BNEW_LEASE_POLL_S": "1",
                 "BNEW_LEASE_HEARTBEAT_S": "1", "BNEW_LEASE_TIMEOUT_S": "8", **env}
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "sweep", command, str(path), "--local", "--max-batches",
                             "8"], cwd=tmp_path, env=variables, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def pretrain_runs(server: str) -> list:
    client = MlflowClient(server)
    ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return client.search_runs(ids, "tags.`bnew.stage` = 'pretrain'")


def trained(runs: list) -> list:
    return [run for run in runs if run.info.status == "FINISHED" and "bnew.reused_from" not in run.data.tags]


@pytest.mark.slow
def test_two_sweeps_at_once_train_their_shared_pretrained_model_once(tmp_path: Path, server: str) -> None:
    # Whichever sweep trains the shared pretrain holds it after epoch 1 until the other waits for it:
    # the other finds it mid-stage however slowly its own driver starts.
    gate = tmp_path / "go-on"
    first, second = (driver(tmp_path, server, spec(name, optimiser, 20), BNEW_SWEEP_FAULT="*/pretrain/*@1:hold",
                            BNEW_SWEEP_FAULT_GATE=str(gate))
                     for name, optimiser in (("ste-one", "ste"), ("bnew-one", "bnew")))
    deadline = time.time() + 600
    while (time.time() < deadline and None in (first.poll(), second.poll())
           and not any("bnew.waiting_for_run" in run.data.tags for run in pretrain_runs(server))):
        time.sleep(1)
    gate.touch()
    outputs = [process.communicate(timeout=900)[0] for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    runs = pretrain_runs(server)
    assert len(trained(runs)) == 1, [(r.info.run_name, r.info.status, r.data.tags) for r in runs]
    assert len({run.data.tags["bnew.stage_key"] for run in runs}) == 1
    assert {run.data.tags["bnew.sweep"] for run in runs if run.info.status == "FINISHED"} == {"ste-one", "bnew-one"}
    waited = [output for output in outputs if "wait   " in output]
    assert len(waited) == 1 and "waits for sweep" in waited[0], outputs  # the console says whom it waits for
    assert all("Traceback" not in output for output in outputs)


@pytest.mark.slow
def test_the_leading_driver_killed_mid_stage_the_other_sweep_takes_it_over(tmp_path: Path, server: str) -> None:
    # The leader's trial stops after epoch 3 (its checkpoint sent, its lease renewed) until it is
    # killed: the follower finds it mid-stage however fast this machine trains 60 epochs.
    leader = driver(tmp_path, server, spec("leader", "ste", 60), BNEW_SWEEP_FAULT="leader/pretrain/*@3:exit",
                    BNEW_SWEEP_FAULT_GATE=str(tmp_path / "never"))
    deadline = time.time() + 600
    while time.time() < deadline:  # until the leader's pretrain has a checkpoint in MLflow
        runs = [run for run in pretrain_runs(server) if run.info.status == "RUNNING" and run.data.metrics.get("epoch", -1) >= 1]
        if runs and MlflowClient(server).list_artifacts(runs[0].info.run_id, "checkpoint"):
            break
        time.sleep(1)
    assert runs, leader.stdout.read() if leader.poll() is not None else "the leader never checkpointed"
    follower = driver(tmp_path, server, spec("follower", "bnew", 60))
    deadline = time.time() + 600
    while (follower.poll() is None and time.time() < deadline
           and not any("bnew.waiting_for_run" in run.data.tags for run in pretrain_runs(server))):
        time.sleep(1)  # until the follower waits on the leader's lease
    assert follower.poll() is None, follower.stdout.read()
    os.killpg(leader.pid, signal.SIGKILL)  # its driver, local Ray and trial: heartbeats stop
    leader.wait()
    output = follower.communicate(timeout=900)[0]
    assert follower.returncode == 0, output
    finished = trained(pretrain_runs(server))
    assert len(finished) == 1 and finished[0].data.tags["bnew.sweep"] == "follower"
    assert finished[0].data.tags["bnew.continued_from_run"] == runs[0].info.run_id  # the leader's run
    assert int(finished[0].data.tags["bnew.resumed_from_epoch"]) >= 2  # from its checkpoint, not from scratch
    # The leader's run died with its driver, RUNNING; resumed, the leader links the follower's run
    # and marks its own superseded by it, so no run of either sweep is left RUNNING.
    resumed = driver(tmp_path, server, spec("leader", "ste", 60), command="resume")
    output = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, output
    client = MlflowClient(server)
    leader_run = client.get_run(runs[0].info.run_id)
    assert leader_run.info.status == "KILLED"
    assert leader_run.data.tags["bnew.superseded_by"] == finished[0].info.run_id
    everything = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [run.info.run_name for run in everything if run.info.status == "RUNNING"] == []


def trial_process(driver_process: subprocess.Popen) -> int | None:
    """The process training the driver's trial (Ray's title for a function trainable), in the
    driver's local Ray; a trial runs in a process group of its own."""
    processes = process_table()
    return next((pid for pid in descendants(driver_process.pid, processes)
                 if processes[pid][1].startswith("ray::ImplicitFunc")), None)


@pytest.mark.slow
def test_a_paused_holder_that_lost_its_stage_is_superseded_not_recorded(tmp_path: Path, server: str) -> None:
    """The leader's trial is SIGSTOPped past the lease timeout while the follower waits; the
    follower takes the stage over; the leader, continued, finds it lost the lease: its run ends
    KILLED and superseded, and the stage has one result, the follower's."""
    gate = tmp_path / "go-on"  # the leader holds after epoch 2 (renewing) until it is paused
    leader = driver(tmp_path, server, spec("paused", "ste", 40), BNEW_SWEEP_FAULT="paused/pretrain/*@2:hold",
                    BNEW_SWEEP_FAULT_GATE=str(gate))
    deadline = time.time() + 600
    while leader.poll() is None and time.time() < deadline:  # until its pretrain is held, checkpointed
        runs = [run for run in pretrain_runs(server) if run.data.metrics.get("epoch", -1) >= 1]
        if runs and MlflowClient(server).list_artifacts(runs[0].info.run_id, "checkpoint"):
            break
        time.sleep(1)
    follower = driver(tmp_path, server, spec("taker", "bnew", 40))
    while (follower.poll() is None and time.time() < deadline
           and not any("bnew.waiting_for_run" in run.data.tags for run in pretrain_runs(server))):
        time.sleep(1)
    paused = trial_process(leader)
    assert paused is not None and leader.poll() is None and follower.poll() is None, leader.stdout.read()
    os.kill(paused, signal.SIGSTOP)  # its heartbeat stops with it
    try:
        gate.touch()  # once continued, it trains on
        while time.time() < deadline and not any(
                run.data.tags.get("bnew.sweep") == "taker" and "bnew.continued_from_run" in run.data.tags
                for run in pretrain_runs(server)):
            time.sleep(1)  # until the follower has taken the stage over
    finally:
        os.kill(paused, signal.SIGCONT)
    outputs = [process.communicate(timeout=900)[0] for process in (leader, follower)]
    assert [process.returncode for process in (leader, follower)] == [0, 0], outputs
    runs = pretrain_runs(server)
    described = [(run.info.run_name, run.info.status, run.data.tags) for run in runs]
    (finished,) = trained(runs)
    assert finished.data.tags["bnew.sweep"] == "taker", described
    (superseded,) = [run for run in runs if run.data.tags.get("bnew.sweep") == "paused"
                     and "bnew.reused_from" not in run.data.tags]
    assert superseded.info.status == "KILLED", described
    assert superseded.data.tags["bnew.superseded_by"] == finished.info.run_id
    assert finished.data.tags["bnew.continued_from_run"] == superseded.info.run_id
    reused = [run for run in runs if run.data.tags.get("bnew.reused_from") == finished.info.run_id]
    assert [run.data.tags["bnew.sweep"] for run in reused] == ["paused"], described  # the leader goes on with it
    assert all("Traceback" not in output for output in outputs), outputs


@pytest.mark.slow
def test_a_shared_stage_that_fails_for_good_is_reported_by_both_sweeps(tmp_path: Path, server: str) -> None:
    gate = tmp_path / "fail-now"  # the first sweep's pretrain fails once the second waits for it
    first = driver(tmp_path, server, spec("fails-one", "ste", 6), BNEW_SWEEP_FAULT="fails-one/pretrain/*@2:final",
                   BNEW_SWEEP_FAULT_GATE=str(gate))
    deadline = time.time() + 600
    while time.time() < deadline and not any("epoch" in run.data.metrics for run in pretrain_runs(server)):
        time.sleep(1)  # the first holds the stage
    second = driver(tmp_path, server, spec("fails-two", "bnew", 6))
    while time.time() < deadline and not any("bnew.waiting_for_run" in run.data.tags for run in pretrain_runs(server)):
        time.sleep(1)
    gate.touch()
    outputs = [process.communicate(timeout=900)[0] for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [1, 1], outputs
    runs = {run.data.tags["bnew.sweep"]: run for run in pretrain_runs(server)}
    assert {run.info.status for run in runs.values()} == {"FAILED"} and set(runs) == {"fails-one", "fails-two"}
    assert "injected failure for good after epoch 2" in runs["fails-one"].data.tags["bnew.error"]
    assert runs["fails-two"].data.tags["bnew.error"].startswith(
        f"BnewError: stage failed in sweep fails-one (run {runs['fails-one'].info.run_id}): ")
    assert "epoch" not in runs["fails-two"].data.metrics  # it trained nothing
    assert all("failed: " in output for output in outputs), "\n=====\n".join(outputs)
