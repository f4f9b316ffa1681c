"""How a sweep's closing lines sort its unfinished stages, from MLflow (`sweeps.run.driver.finish`):
a trial stopped from outside (Ctrl-C, `bnew sweep stop`, a lost process) is interrupted, not
failed; another sweep's run of a shared stage says nothing about this sweep's; a retried
trial reopens its run without the failed attempt's error; and an attempt left RUNNING (its node
and driver lost) whose stage another sweep then trained is superseded when the sweep comes back."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec
from sweeps.cli.sweep import report_outcome
from sweeps.records.tracker import Tracker
from sweeps.run.driver import finish, open_sweep
from sweeps.run.outcome import SweepOutcome
from sweeps.run.trial import SweepContext


def test_stopped_trials_are_interrupted_and_a_failed_one_failed(tmp_path: Path, capsys) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    plan = build_plan(load_spec("demo"), "demo", 1, 1)
    experiment_id, other = tracker.experiment_id("demo"), tracker.experiment_id("another-sweep")
    parent = tracker.client.create_run(experiment_id, tags={"bnew.role": "sweep"}).info.run_id
    context = SweepContext("demo", tracker.uri, experiment_id, parent)
    stages = list(plan.stages.values())
    states = {stages[0].key: "FAILED", stages[1].key: "RUNNING", stages[2].key: "KILLED", stages[3].key: "FINISHED"}
    for stage in stages[:4]:
        run_id = tracker.open_trial_run(experiment_id, parent, "demo", stage, stage.roles[0])
        if states[stage.key] != "RUNNING":
            tracker.client.set_terminated(run_id, states[stage.key])
    shared = stages[4]  # another sweep is training it: not this sweep's failure, and not run here
    tracker.open_trial_run(other, parent, "another-sweep", shared, shared.roles[0])
    outcome = SweepOutcome(interrupted="SIGINT")
    finish(tracker, context, outcome, stages[:5])
    assert outcome.failed == {stages[0].key}
    assert outcome.interrupted_stages == {stages[1].key, stages[2].key}  # the RUNNING one is marked KILLED now
    assert outcome.trained == {stages[3].key} and outcome.not_run == {shared.key}
    assert tracker.client.search_runs([other])[0].info.status == "RUNNING"  # the other sweep's run is left alone
    with pytest.raises(typer.Exit) as exited:  # the closing lines, as `bnew sweep run` prints them
        report_outcome(outcome, plan, "demo")
    assert exited.value.exit_code == 130
    err = capsys.readouterr().err
    assert f"failed: {stages[0].name}" in err and f"interrupted: {stages[1].name}" in err
    assert f"failed: {stages[1].name}" not in err and f"failed: {stages[2].name}" not in err


def test_a_retried_trial_reopens_its_run_without_the_failed_attempts_error_and_log_tail(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    stage = next(iter(build_plan(load_spec("demo"), "demo", 1, 1).stages.values()))
    experiment_id = tracker.experiment_id("demo")
    parent = tracker.client.create_run(experiment_id, tags={"bnew.role": "sweep"}).info.run_id
    run_id = tracker.open_trial_run(experiment_id, parent, "demo", stage, stage.roles[0], {"bnew.node": "first"})
    tracker.client.set_tag(run_id, "bnew.log_tail", "Traceback ...\nRuntimeError: lost")
    tracker.fail_trial(run_id, "RuntimeError: lost")
    again = tracker.open_trial_run(experiment_id, parent, "demo", stage, stage.roles[0], {"bnew.node": "second"})
    run = tracker.client.get_run(again)
    assert again == run_id and run.info.status == "RUNNING"
    assert not {"bnew.error", "bnew.log_tail", "bnew.final_failure"} & set(run.data.tags)
    assert run.data.tags["bnew.node"] == "second"  # where the retry runs


def test_an_attempt_left_running_whose_stage_another_sweep_trained_is_superseded_when_the_sweep_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    spec = load_spec("demo")
    plan = build_plan(spec, "demo", 1, 1)
    tracker = Tracker(spec.resolved_tracking_uri())
    experiment_id, other = tracker.experiment_id(spec.name), tracker.experiment_id("another-sweep")
    parent = tracker.open_sweep_run(experiment_id, spec.name, "")
    stage = next(iter(plan.stages.values()))
    lost = tracker.open_trial_run(experiment_id, parent, spec.name, stage, stage.roles[0])  # its node died: RUNNING
    taker = tracker.open_trial_run(other, parent, "another-sweep", stage, stage.roles[0])
    tracker.client.set_terminated(taker, "FINISHED")  # took the stage over once the lease went stale
    _, _, outcome = open_sweep(spec, plan, lambda line: None)
    run = tracker.client.get_run(lost)
    assert stage.key in outcome.reused
    assert run.info.status == "KILLED" and run.data.tags["bnew.superseded_by"] == taker
    assert f"run {taker} trained the stage" in run.data.tags["bnew.error"]
    linked = [r for r in tracker.trial_runs(experiment_id) if r.data.tags.get("bnew.stage_key") == stage.key
              and r.info.status == "FINISHED"]
    assert [r.data.tags["bnew.reused_from"] for r in linked] == [taker]  # the sweep's result is the taker's
