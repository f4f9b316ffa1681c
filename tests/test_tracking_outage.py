"""A dead MLflow server loses nothing: a trial trains on while the server is down, the epochs it
could not log are sent once the server is back, a trial that ends during the outage fails
and is finished by its retry from the final checkpoint, every epoch logged exactly once, and a
trial that cannot renew its stage's lease for the timeout stops and is finished by its retry.
Real `mlflow server` processes (killed and restarted on the same store); no Ray needed."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from bnew_core.callbacks import Callback
from sweeps.records import leases
from sweeps.run.driver import open_sweep
from sweeps.run.trial import execute_stage
from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec


class Server:
    """`mlflow server` on 127.0.0.1 over a sqlite store and an artifact folder that outlive it."""

    def __init__(self, state: Path) -> None:
        self.state = state
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.state / "mlflow.log", "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}", "--serve-artifacts",
             "--artifacts-destination", str(self.state / "artifacts"), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300  # a hang, not a slow start: a busy 2-core machine needs minutes
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not come up: {(self.state / 'mlflow.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None


class Outage(Callback):
    """Stops the server after epoch `down_after` and starts it again after epoch `up_after`
    (runs after the MLflow logger, so epoch `down_after` is logged and `up_after` is not)."""

    def __init__(self, server: Server, down_after: int, up_after: int | None) -> None:
        self.server, self.down_after, self.up_after = server, down_after, up_after

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint: Path | None) -> None:
        if epoch == self.down_after:
            self.server.stop()
        if epoch == self.up_after:
            self.server.start()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Fail fast while the server is down instead of MLflow's default minutes of retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    (tmp_path / "server").mkdir()
    running = Server(tmp_path / "server")
    running.start()
    yield running
    running.stop()


def pretrain_stage(tmp_path: Path, name: str, tracking_uri: str):
    """The 4-epoch pretrain stage of a one-trial digits sweep, with its MLflow context."""
    spec_path = tmp_path / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": name, "tracking_uri": tracking_uri,
        "axes": {"dataset": ["digits"], "optimiser": ["ste"], "seed": [0], "budget": [2]},
        "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": 4}},
        "checkpoint": {"every_epochs": 1},
    }))
    plan = build_plan(load_spec(str(spec_path)))
    (stage,) = [stage for stage in plan.stages.values() if stage.phase == "pretrain"]
    _, context, _ = open_sweep(load_spec(str(spec_path)), plan, lambda line: None)
    return stage, context


def the_run(uri: str, sweep: str):
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(sweep).experiment_id], "tags.`bnew.role` = 'trial'")
    return client, run


def test_epochs_logged_while_the_server_is_down_are_sent_when_it_is_back(
        server: Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stage, context = pretrain_stage(tmp_path, "outage", server.uri)
    execute_stage(stage, context, tmp_path / "work", callbacks=[Outage(server, down_after=0, up_after=2)])
    assert "MLflow did not take the metrics of epoch(s) 1, 2" in capsys.readouterr().out
    client, run = the_run(server.uri, "outage")
    assert run.info.status == "FINISHED"
    assert sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2, 3]


def test_a_trial_ending_in_an_outage_is_finished_by_its_retry(server: Server, tmp_path: Path) -> None:
    stage, context = pretrain_stage(tmp_path, "ends-down", server.uri)
    work = tmp_path / "work"
    with pytest.raises(Exception):  # epoch 3 cannot be logged and the run cannot be closed
        execute_stage(stage, context, work, callbacks=[Outage(server, down_after=2, up_after=None)])
    checkpoint = work / "output" / "checkpoint.pt"
    assert checkpoint.exists()  # the finished training is on disk, where Tune keeps it
    server.start()
    execute_stage(stage, context, work, resume_from=checkpoint)  # what Tune's retry does: no epoch retrained
    client, run = the_run(server.uri, "ends-down")
    assert run.info.status == "FINISHED" and "bnew.error" not in run.data.tags
    assert run.data.tags["bnew.resumed_from_epoch"] == "4"
    assert sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2, 3]
    assert "model.pt" in {item.path for item in client.list_artifacts(run.info.run_id)}


class Stall(Callback):
    """The training goes on for `seconds` after epoch `after` (as a longer epoch would): the
    server is down meanwhile, so the lease's renewals fail for longer than the timeout."""

    def __init__(self, after: int, seconds: float) -> None:
        self.after, self.seconds = after, seconds

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint: Path | None) -> None:
        if epoch == self.after:
            time.sleep(self.seconds)


def test_a_holder_that_cannot_renew_its_lease_stops_and_its_retry_finishes_the_stage(
        server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(leases, "HEARTBEAT_S", 0.5)
    monkeypatch.setattr(leases, "LEASE_TIMEOUT_S", 3.0)
    stage, context = pretrain_stage(tmp_path, "unrenewed", server.uri)
    work = tmp_path / "work"
    with pytest.raises(Exception):  # it stopped, and MLflow cannot be asked who holds the stage
        execute_stage(stage, context, work, callbacks=[Outage(server, down_after=0, up_after=None), Stall(1, 5.0)])
    stopped = [line for line in capsys.readouterr().out.splitlines() if "could not renew the lease" in line]
    assert len(stopped) == 1 and "(MLflow unreachable?): stopped training it" in stopped[0], stopped  # one line says why
    checkpoint = work / "output" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["epoch"] < 3  # it stopped before the stage's end
    server.start()
    execute_stage(stage, context, work, resume_from=checkpoint)  # Tune's retry, once MLflow is back
    client, run = the_run(server.uri, "unrenewed")
    assert run.info.status == "FINISHED" and "bnew.error" not in run.data.tags
    assert sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2, 3]
    assert client.search_experiments(filter_string=f"name LIKE '{leases.LEASE_PREFIX}%'") == []  # released
