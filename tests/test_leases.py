"""Stage leases (`sweeps/records/leases.py`): sweeps that share a stage train it once. On a real
MLflow store: racing claims, a stale holder taken over, a release; then real sweeps, each with
its own driver and local Ray, logging to one `mlflow server`: two at once sharing their
pretrained model, the leading driver killed mid-stage, and a shared stage that fails for good."""

from __future__ import annotations

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
from servers import mlflow_server


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


def test_a_stale_lease_is_taken_over_and_a_live_one_is_not(tracker: Tracker) -> None:
    first, second = Lease(tracker, "k", "a", "run-a"), Lease(tracker, "k", "b", "run-b")
    assert first.claim() is None
    assert second.claim().run_id == "run-a"  # live: the second waits
    first.stop_heartbeat.set()  # its driver dies: no more beats, and the last one is old
    old = leases.now_ms() - int(leases.LEASE_TIMEOUT_S * 1000) - 1000
    tracker.client.set_experiment_tag(first.experiment_id, HEARTBEAT_TAG, str(old))
    assert second.claim() is None
    assert second.holder().run_id == "run-b"


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


def driver(tmp_path: Path, server: str, sweep: dict, **env: str) -> subprocess.Popen:
    path = tmp_path / f"{sweep['name']}.yaml"
    path.write_text(yaml.safe_dump(sweep))
    variables = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BNEW_SWEEP_FAULT")},
                 "MLFLOW_TRACKING_URI": server, "BNEW_PROJECT_DIR": str(tmp_path), "BNEW_LEASE_POLL_S": "1",
                 "BNEW_LEASE_HEARTBEAT_S": "1", "BNEW_LEASE_TIMEOUT_S": "8", **env}
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "sweep", "run", str(path), "--local", "--max-batches",
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
