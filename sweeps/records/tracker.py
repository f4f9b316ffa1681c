"""MLflow records of a sweep: one experiment per sweep, a parent run holding the spec, one
nested run per trial. A stage's FINISHED run (tag `bnew.stage_key`) in any experiment is what
makes it reusable; its `model.pt` artifact is the input of the stages after it.

Everything goes through an explicit `MlflowClient` (no global active run), so the driver, Tune
trials and debug runs in one process never mix up their runs."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException

from bnew_core.config import BnewError
from sweeps.core.dotted import flatten
from sweeps.core.plan import Role, Stage
from sweeps.core.schema import (
    ERROR_TAG,
    FINAL_FAILURE_TAG,
    INTERRUPTED_TAG,
    LOG_TAIL_TAG,
    MLFLOW_PARENT_TAG,
    REUSED_FROM_TAG,
    ROLE_TAG,
    STAGE_KEY_TAG,
    STOPPED_EARLY_TAG,
    SUPERSEDED_BY_TAG,
    SWEEP_TAG,
    quote,
)
from sweeps.records.lineage import record_reused

SPEC_ARTIFACT = "spec.yaml"
"""The spec of the sweep, on its parent run (what `status` plans again and `report` lays out)."""


class Tracker:
    """The MLflow side of a sweep."""

    def __init__(self, tracking_uri: str):
        self.uri = tracking_uri
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # A new local store's two "Creating initial MLflow database tables" INFO lines are
            # not news on the console; its schema errors are WARNING and above and still show.
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri)

    # --- experiment and parent run -------------------------------------------------------
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        # A local store keeps artifacts beside the database; a server decides for itself.
        location = None
        if self.uri.startswith("sqlite:///"):
            location = str(Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts" / name)
        return self.client.create_experiment(name, artifact_location=location)

    def sweep_run(self, experiment_id: str) -> Run | None:
        """The sweep's parent run: the first one, which every later run of the sweep reopens."""
        runs = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def open_sweep_run(self, experiment_id: str, name: str, spec_yaml: str) -> str:
        """The sweep's parent run (the same one on every run of the sweep), with the spec attached."""
        existing = self.sweep_run(experiment_id)
        if existing is None:
            run_id = self.client.create_run(
                experiment_id, run_name=name, tags={ROLE_TAG: "sweep", SWEEP_TAG: name}
            ).info.run_id
        else:
            run_id = existing.info.run_id
            self.client.update_run(run_id, status="RUNNING")
            if INTERRUPTED_TAG in existing.data.tags:
                self.client.delete_tag(run_id, INTERRUPTED_TAG)
        self.client.log_text(run_id, spec_yaml, SPEC_ARTIFACT)
        return run_id

    def finish_sweep_run(self, run_id: str, failed: int, interrupted: str | None = None) -> None:
        """Close the parent run: KILLED if a signal stopped the sweep (tag `bnew.interrupted`)."""
        self.client.set_tag(run_id, "bnew.failed_trials", str(failed))
        if interrupted:
            self.client.set_tag(run_id, INTERRUPTED_TAG, interrupted)
        self.client.set_terminated(run_id, "KILLED" if interrupted else "FAILED" if failed else "FINISHED")

    def sweep_spec(self, run_id: str) -> dict[str, Any] | None:
        """The spec stored on the sweep's parent run, or None when it has none (a run of another tool)."""
        with tempfile.TemporaryDirectory() as folder:
            try:
                path = self.client.download_artifacts(run_id, SPEC_ARTIFACT, folder)
            except (MlflowException, OSError):  # the artifact store's error for a missing file
                return None
            return yaml.safe_load(Path(path).read_text()) or {}

    # --- stage lookup --------------------------------------------------------------------
    # MLflow filters have no OR or IN for tags, so keys are looked up one by one with an equality
    # filter on `bnew.stage_key`; what the sweep's own experiment holds is read in one scan first.
    # Each lookup returns only that key's runs, so the cost is linear in the keys looked up, never
    # a scan of the whole store per trial.
    def search_all(self, experiment_ids: list[str], filter_string: str) -> list[Run]:
        """Every run matching `filter_string`, newest first, page by page."""
        runs: list[Run] = []
        page_token = None
        while True:
            page = self.client.search_runs(
                experiment_ids, filter_string=filter_string, order_by=["attributes.start_time DESC"],
                max_results=1000, page_token=page_token,
            )
            runs.extend(page)
            page_token = page.token
            if not page_token:
                return runs

    def all_experiment_ids(self) -> list[str]:
        """Every active experiment, page by page."""
        ids: list[str] = []
        page_token = None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=page_token)
            ids.extend(experiment.experiment_id for experiment in page)
            page_token = page.token
            if not page_token:
                return ids

    def runs_of_stage(self, key: str, experiment_ids: list[str]) -> list[Run]:
        """Trial runs of stage `key` in `experiment_ids`, newest first: one lookup."""
        return self.search_all(experiment_ids, f"tags.`{STAGE_KEY_TAG}` = {quote(key)}")

    def stage_runs(self, keys: list[str], sweep_runs: Sequence[Run] = ()) -> dict[str, list[Run]]:
        """Trial runs per stage key, in any experiment, newest first.

        `sweep_runs`: the trial runs of the sweep's own experiment (`trial_runs`), if the caller
        has read them; a key with a trained FINISHED run among them needs no other lookup. Every
        other key costs one lookup across all experiments."""
        found: dict[str, list[Run]] = {key: [] for key in keys}
        for run in sweep_runs:
            key = run.data.tags.get(STAGE_KEY_TAG)
            if key in found:
                found[key].append(run)
        missing = [key for key in keys if not trained_runs(found[key])]
        experiment_ids = self.all_experiment_ids() if missing else []
        for key in missing:
            found[key] = self.runs_of_stage(key, experiment_ids)
        return found

    def finished_stages(self, keys: list[str], runs_by_key: dict[str, list[Run]] | None = None) -> dict[str, Run]:
        """Stage key -> the FINISHED run that trained it, in any experiment."""
        finished: dict[str, Run] = {}
        for key, runs in (runs_by_key or self.stage_runs(keys)).items():
            trained = trained_runs(runs)
            if trained:
                finished[key] = trained[0]
        return finished

    def download_model(self, key: str, destination: Path) -> Path:
        """The model.pt of the finished run of stage `key`."""
        run = self.finished_stages([key]).get(key)
        if run is None:
            raise BnewError(f"stage {key}: no finished MLflow run with tag bnew.stage_key={key} to take model.pt from")
        destination.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run.info.run_id, "model.pt", str(destination)))

    # --- trial runs ----------------------------------------------------------------------
    def open_trial_run(self, experiment_id: str, parent_run_id: str, sweep: str, stage: Stage, role: Role,
                       tags: dict[str, str] | None = None) -> str:
        """The trial's run, with `tags` too: a retry or a rerun of the sweep continues the unfinished one."""
        tags = tags or {}
        for run in self.own_runs(experiment_id, stage, role):
            if run.info.status != "FINISHED":
                self.client.update_run(run.info.run_id, status="RUNNING")
                for tag in (ERROR_TAG, FINAL_FAILURE_TAG, LOG_TAIL_TAG):  # the failed attempt's
                    if tag in run.data.tags:
                        self.client.delete_tag(run.info.run_id, tag)
                if tags:
                    self.client.log_batch(run.info.run_id, tags=[RunTag(key, value) for key, value in tags.items()])
                return run.info.run_id
        run_id = self.client.create_run(
            experiment_id, run_name=role.name, tags={**self.trial_tags(parent_run_id, sweep, stage, role), **tags}
        ).info.run_id
        self.log_params(run_id, stage.config)
        return run_id

    def own_runs(self, experiment_id: str, stage: Stage, role: Role) -> list[Run]:
        """The runs that trained `role` in the experiment (not those linked to a run of another sweep,
        nor those a scheduler stopped early or another trial superseded: their stage is trained
        again in a new run)."""
        return [run for run in self.runs_of_stage(stage.key, [experiment_id]) if run.info.run_name == role.name
                and not {REUSED_FROM_TAG, STOPPED_EARLY_TAG, SUPERSEDED_BY_TAG} & set(run.data.tags)]

    @staticmethod
    def trial_tags(parent_run_id: str, sweep: str, stage: Stage, role: Role) -> dict[str, str]:
        return {
            MLFLOW_PARENT_TAG: parent_run_id,
            ROLE_TAG: "trial",
            SWEEP_TAG: sweep,
            STAGE_KEY_TAG: stage.key,
            **role.tags,
        }

    def log_params(self, run_id: str, config: dict[str, Any]) -> None:
        params = [Param(key, str(value)) for key, value in flatten(config).items()]
        for start in range(0, len(params), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=params[start : start + 100])

    def logged_epochs(self, run_id: str) -> set[int]:
        """Epochs whose metrics the run already holds (a continued run's earlier attempts)."""
        return {metric.step for metric in self.client.get_metric_history(run_id, "loss")}

    def log_epoch(self, run_id: str, metrics: dict[str, float]) -> None:
        step, now = int(metrics["epoch"]), int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def finish_trial(self, run_id: str, output_dir: Path, final_metrics: dict[str, float]) -> None:
        self.client.log_metric(run_id, "final_test_acc_binary", float(final_metrics["test_acc_binary"]))
        self.client.log_artifact(run_id, str(output_dir / "config.yaml"))
        self.client.log_artifact(run_id, str(output_dir / "model.pt"))
        self.client.log_artifact(run_id, str(output_dir / "checkpoint.pt"), "checkpoint")
        self.client.set_terminated(run_id, "FINISHED")

    def fail_trial(self, run_id: str, message: str, killed: bool = False, final: bool = False) -> None:
        """FAILED with the reason in `bnew.error`; KILLED if it was stopped from outside; `final`:
        no retry can fix it (`bnew.final_failure`, which sweeps waiting for its stage read)."""
        self.client.set_tag(run_id, ERROR_TAG, message.splitlines()[0][:4000] if message else "failed")
        if final:
            self.client.set_tag(run_id, FINAL_FAILURE_TAG, "1")
        self.client.set_terminated(run_id, "KILLED" if killed else "FAILED")

    def supersede_trial(self, run_id: str, taker: Run) -> None:
        """KILLED, naming the run that took its stage over while it had lost the stage's lease."""
        self.client.set_tag(run_id, SUPERSEDED_BY_TAG, taker.info.run_id)
        self.fail_trial(run_id, f"superseded: it lost its stage's lease, and run {taker.info.run_id} "
                                f"trained the stage (this run's result is not the stage's)", killed=True)

    def kill_running_trials(self, experiment_id: str, runs_by_key: dict[str, list[Run]], reason: str) -> None:
        """Mark the experiment's trial runs still RUNNING as KILLED, with `reason` in `bnew.error`
        (for a driver whose trials Tune has all ended: none of them runs any more). Those a stop
        already marked KILLED get the reason too."""
        for runs in runs_by_key.values():
            for run in runs:
                if run.info.experiment_id == experiment_id and run.info.status in ("RUNNING", "SCHEDULED", "KILLED"):
                    self.fail_trial(run.info.run_id, reason, killed=True)

    def link_role(self, source: Run, experiment_id: str, parent_run_id: str, sweep: str, stage: Stage, role: Role) -> str:
        """A trial run for `role` whose stage was trained by `source` (another sweep, or another
        role of this one): same params and metrics, tag `bnew.reused_from`, no artifacts."""
        tags = {**self.trial_tags(parent_run_id, sweep, stage, role), REUSED_FROM_TAG: source.info.run_id}
        run_id = self.client.create_run(experiment_id, run_name=role.name, tags=tags).info.run_id
        self.log_params(run_id, stage.config)
        record_reused(self.client, source, run_id, role)
        history = [
            metric
            for key in source.data.metrics
            for metric in self.client.get_metric_history(source.info.run_id, key)
        ]
        for start in range(0, len(history), 1000):
            self.client.log_batch(run_id, metrics=history[start : start + 1000])
        self.client.set_terminated(run_id, "FINISHED")
        return run_id

    def link_missing_roles(
        self, experiment_id: str, parent_run_id: str, sweep: str, stage: Stage, runs: list[Run] | None = None
    ) -> None:
        """Give every role of a finished stage its run in this sweep's experiment.

        A link an earlier attempt began and never finished (a write failed or its process died
        between `link_role`'s create and its end; Tune then retries the trial, which links
        again) is deleted first: its params and metrics may be partial, and left RUNNING the
        driver's end would mark it KILLED in a sweep that succeeded. An attempt of this sweep
        still RUNNING lost the stage to the run that trained it (its process died or paused past
        the lease's timeout, and its driver may be gone too): it is marked superseded by that run,
        as the fence marks a holder that comes back.

        `runs`: the stage's runs in every experiment, if the caller has them already."""
        runs = self.stage_runs([stage.key])[stage.key] if runs is None else runs
        own = [run for run in runs if run.info.experiment_id == experiment_id]
        for run in own:
            if run.info.status != "FINISHED" and REUSED_FROM_TAG in run.data.tags:
                self.client.delete_run(run.info.run_id)
        trained = trained_runs(runs)
        if not trained:
            return
        for run in own:
            if run.info.status in ("RUNNING", "SCHEDULED") and REUSED_FROM_TAG not in run.data.tags:
                self.supersede_trial(run.info.run_id, trained[0])
        present = {run.info.run_name for run in own if run.info.status == "FINISHED"}
        for role in stage.roles:
            if role.name not in present:
                self.link_role(trained[0], experiment_id, parent_run_id, sweep, stage, role)

    def trial_runs(self, experiment_id: str) -> list[Run]:
        """Every trial run of one experiment (a sweep), newest first."""
        return self.search_all([experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")


def trained_runs(runs: list[Run]) -> list[Run]:
    """The FINISHED runs that trained their stage (not linked to another run)."""
    return [run for run in runs if run.info.status == "FINISHED" and REUSED_FROM_TAG not in run.data.tags]

