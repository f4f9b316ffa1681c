"""Two sweeps sharing a stage, driven in this process (no Ray) on one MLflow store, as two jobs'
drivers and trials meet on a cluster: one sweep trains the shared pretrained model, the other's
trial finds it finished and links it. What a successful sweep leaves must read FINISHED, also when
a step of the link fails and Tune retries the trial, and trials that start together must not
fail on MLflow's store."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from sweeps.core.plan import Stage, build_plan
from sweeps.core.schema import REUSED_FROM_TAG
from sweeps.core.spec import parse_spec
from sweeps.records import lineage
from sweeps.run.driver import finish, open_sweep
from sweeps.run.trial import execute_stage

LOST_RACE = ('(psycopg2.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"\n'
             'DETAIL:  Key (experiment_id, name, digest)=(2, digits, 0123456789abcdef) already exists.')
"""What MLflow's SQL store answers (BAD_REQUEST, not retried) to the log_inputs that loses a race
to add the same new dataset to an experiment."""


def sweep_spec(name: str, uri: str, optimisers: list[str], seeds: list[int]) -> Any:
    """Digits sweeps with the same pretrained models, one short epoch each."""
    return parse_spec({"name": name, "tracking_uri": uri,
                       "axes": {"dataset": ["digits"], "optimiser": optimisers, "seed": seeds, "budget": [2]},
                       "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": 1}}}, name)


def pretrain_stage(plan: Any) -> Stage:
    return next(stage for stage in plan.stages.values() if stage.phase == "pretrain")


def work_dir(path: Path) -> Path:
    """A trial's working folder (Tune's trial makes a temporary one)."""
    path.mkdir()
    return path


def test_a_link_cut_short_leaves_no_unfinished_run_once_its_retry_links_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    specs = {"trains": sweep_spec("trains", uri, ["ste"], [0]), "links": sweep_spec("links", uri, ["bnew"], [0])}
    plans = {name: build_plan(spec, name, max_batches=2) for name, spec in specs.items()}
    # Both sweeps plan before either trains (as two jobs submitted at once): the stage is theirs to train.
    opened = {name: open_sweep(specs[name], plans[name], lambda line: None) for name in specs}
    execute_stage(pretrain_stage(plans["trains"]), opened["trains"][1], work_dir(tmp_path / "trains"))
    stage = pretrain_stage(plans["links"])
    assert stage.key == pretrain_stage(plans["trains"]).key

    tracker, context, outcome = opened["links"]
    log_inputs = MlflowClient.log_inputs
    failed: list[str] = []

    def lost_race(client: MlflowClient, run_id: str, *args: Any, **kwargs: Any) -> None:
        if not failed:  # the link's first write of the dataset, as when a trial beside it adds the dataset first
            failed.append(run_id)
            raise MlflowException(LOST_RACE, BAD_REQUEST)
        log_inputs(client, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", lost_race)
    with pytest.raises(MlflowException, match="dataset_pk"):  # the trial's first attempt
        execute_stage(stage, context, work_dir(tmp_path / "links-1"))
    assert REUSED_FROM_TAG in tracker.client.get_run(failed[0]).data.tags  # the write cut short was the link's
    execute_stage(stage, context, work_dir(tmp_path / "links-2"))  # Tune's retry
    finish(tracker, context, outcome, [stage])  # as the job's driver ends

    runs = tracker.runs_of_stage(stage.key, [context.experiment_id])
    assert [(run.info.status, run.data.tags.get(REUSED_FROM_TAG)) for run in runs] == [
        ("FINISHED", tracker.finished_stages([stage.key])[stage.key].info.run_id)
    ], [(run.info.run_name, run.info.status, run.data.tags) for run in runs]
    assert outcome.complete and outcome.trained == {stage.key}


def test_trials_that_start_together_all_record_their_dataset(tmp_path: Path) -> None:
    """MLflow's SQL store adds a dataset to an experiment by looking it up and then inserting it:
    two runs that log the same new dataset at once can both insert it, and the loser fails
    (BAD_REQUEST, on PostgreSQL and SQLite, with or without a server: 2 of 48 trials below before
    the driver logged the sweep's datasets first). Trials that start together all record theirs."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    failures: list[str] = []
    sweeps = []
    for attempt in range(6):  # fresh experiments: the race is on the first dataset each one adds
        spec = sweep_spec(f"together-{attempt}", uri, ["ste", "bnew", "bmd", "bop"], [0, 1])
        plan = build_plan(spec, spec.name, max_batches=2)
        tracker, context, _ = open_sweep(spec, plan, lambda line: None)
        stages = [stage for stage in plan.stages.values() if stage.phase == "quantise"]
        runs = [tracker.open_trial_run(context.experiment_id, context.parent_run_id, spec.name, stage, stage.roles[0])
                for stage in stages]
        start = threading.Barrier(len(stages))

        def record(stage: Stage, run_id: str) -> None:
            start.wait()
            try:
                lineage.record_trial(tracker.client, run_id, stage, stage.roles[0], context.source_tags, {})
            except MlflowException as exc:
                failures.append(str(exc).splitlines()[0])

        threads = [threading.Thread(target=record, args=pair) for pair in zip(stages, runs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sweeps.append((context.parent_run_id, runs))
    assert failures == [], f"{len(failures)} of {6 * len(stages)} trials failed: {failures[0]}"
    for parent_run_id, runs in sweeps:  # the parent holds the sweep's dataset; every trial records the same one
        (parent,) = tracker.client.get_run(parent_run_id).inputs.dataset_inputs
        for run_id in runs:
            (dataset,) = tracker.client.get_run(run_id).inputs.dataset_inputs
            assert (dataset.dataset.name, dataset.dataset.digest) == ("digits", parent.dataset.digest)
