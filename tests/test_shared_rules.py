"""Rules that were written twice and disagreed, now written once (README "Architecture"): what
counts as local, what runs on another machine, where a storage folder is, how nested settings
flatten, which run is a sweep's parent and what a missing spec means, and the experiment link."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from bnew_core.config import BnewError
from sweeps.analysis.report import write_report
from sweeps.analysis.status import sweep_status
from sweeps.core.addresses import check_tracking_reaches, is_local, is_other_machine
from sweeps.core.dotted import flatten, nest
from sweeps.core.spec import SweepSpec
from sweeps.records.links import experiment_url, ui_hint
from sweeps.records.tracker import Tracker
from sweeps.run.checks import check_storage_path
from sweeps.run.jobs import cluster_tracking_uri


@pytest.mark.parametrize("location, local", [
    ("/abs/folder", True), ("relative/folder", True), ("file:///abs/folder", True), ("sqlite:////x/mlflow.db", True),
    ("s3://bucket/prefix", False), ("http://127.0.0.1:5000", False), ("postgresql://db/mlflow", False),
])
def test_one_rule_for_a_location_on_this_disk(location: str, local: bool) -> None:
    assert is_local(location) is local


def test_a_file_uri_storage_is_a_local_folder_everywhere(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    spec = SweepSpec(name="s", storage_path=f"file://{tmp_path}/results")
    assert spec.resolved_storage_path() == str(tmp_path / "results")  # Tune gets a plain folder
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BnewError, match="is a file, not a folder"):  # checked like a plain path (it was skipped)
        check_storage_path(f"file://{tmp_path}/a-file/results")


def test_no_address_means_what_ray_init_joins(monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not is_other_machine(None)
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert is_other_machine(None)  # was taken for this machine by `run`, then joined that cluster
    assert not is_other_machine("local") and not is_other_machine("127.0.0.1:6379")
    own = [address for address in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
           if "." in address]  # this machine's IPv4 addresses
    for address in own:  # a driver on the head node: Ray sets RAY_ADDRESS to the head's own IP
        monkeypatch.setenv("RAY_ADDRESS", f"{address}:6379")
        assert not is_other_machine(None)


@pytest.mark.parametrize("tracking_uri", ["http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db"])
def test_run_and_submit_refuse_the_same_tracking_uris_for_another_machine(tracking_uri: str) -> None:
    with pytest.raises(BnewError, match="tracking_uri"):  # `run --address` let the loopback one pass
        check_tracking_reaches(tracking_uri, "ray://10.1.2.3:10001")
    with pytest.raises(BnewError, match="tracking.uri"):
        cluster_tracking_uri(tracking_uri, None, "http://10.1.2.3:8265")
    check_tracking_reaches("http://mlflow:5000", "ray://10.1.2.3:10001")
    check_tracking_reaches(tracking_uri, "127.0.0.1:6379")  # a loopback cluster shares this machine


def test_flatten_and_nest_are_inverse_and_an_empty_mapping_sets_nothing() -> None:
    nested = {"model": {"scale": False}, "data": {}, "lr": 0.1, "optimiser": {"lambda_rate": 0.5}}
    assert flatten(nested) == {"model.scale": False, "lr": 0.1, "optimiser.lambda_rate": 0.5}
    assert nest(flatten(nested)) == {key: value for key, value in nested.items() if value != {}}


def test_the_parent_run_is_the_first_and_a_missing_spec_is_said_once(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri)
    experiment_id = tracker.experiment_id("legacy")
    first = tracker.client.create_run(experiment_id, run_name="first", tags={"bnew.role": "sweep"}).info.run_id
    tracker.client.create_run(experiment_id, run_name="later", tags={"bnew.role": "sweep"})
    assert tracker.sweep_run(experiment_id).info.run_id == first  # report took the newest, tracking the oldest
    assert tracker.sweep_spec(first) is None  # one answer: status raised, report returned {}
    with pytest.raises(BnewError, match="no spec.yaml"):
        sweep_status("legacy", uri)
    report = write_report(uri, "legacy", tmp_path / "report", log_artifacts=False)
    assert report.tables == [] and "No failed trials" in report.text


def test_the_experiment_link_opens_its_runs_and_never_creates_it(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert experiment_url(uri, "not-yet") is None
    assert MlflowClient(uri).get_experiment_by_name("not-yet") is None  # `submit` created it to link it
    experiment_id = Tracker(uri).experiment_id("there")
    assert experiment_url(uri, "there", "http://mlflow:5000") == \
        f"http://mlflow:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    assert ui_hint(uri, "there").endswith(f"(then http://127.0.0.1:5000/#/experiments/{experiment_id}"
                                          "?workflowType=machine_learning)")
