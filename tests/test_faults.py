"""Faults injected into real processes (a real Ray, a real MLflow store): Ctrl-C on the driver,
a diverging trial, the driver killed, a corrupted checkpoint, a worker node killed. Each test
checks that nothing is lost or duplicated and prints a `FAULT` line with its figures (trials
affected, epochs redone, metrics lost, time to recover): run with `-s` to see them."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def write_spec(directory: Path, name: str, budget: int, lrs: list[float], **extra: Any) -> Path:
    """STE trials straight from scratch (no prerequisite stages), one per lr."""
    spec = {
        "name": name,
        "axes": {"dataset": ["digits"], "optimiser": ["ste"], "ablation": ["no_pretrain"], "seed": [0],
                 "budget": [budget], "params": {"lr": lrs}},
        "base": {"batch_size": 64, "device": "cpu"},
        "max_failures": 2,
        "checkpoint": {"every_epochs": 1},  # faults hit mid-trial: resume from the epoch before
        **extra,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BNEW_SWEEP_FAULT", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def bnew(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env or sweep_env(),
                          capture_output=True, text=True, timeout=600)


def start_bnew(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env or sweep_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the sweep ended before {what}: {out[-2000:]} {err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


class Sweep:
    """The MLflow records of one sweep."""

    def __init__(self, tracking_uri: str, name: str):
        self.uri, self.client, self.name = tracking_uri, MlflowClient(tracking_uri), name

    def runs(self, role: str = "trial") -> list:
        experiment = self.client.get_experiment_by_name(self.name)
        if experiment is None:
            return []
        return self.client.search_runs([experiment.experiment_id], f"tags.`bnew.role` = '{role}'")

    def trial(self, lr: float):
        (run,) = [run for run in self.runs() if float(run.data.params["lr"]) == lr]
        return run

    def steps(self, run_id: str) -> list[int]:
        return [metric.step for metric in self.client.get_metric_history(run_id, "loss")]

    def logged_epochs(self, lr: float) -> int:
        runs = [run for run in self.runs() if float(run.data.params.get("lr", "nan")) == lr]
        return len(self.steps(runs[0].info.run_id)) if runs else 0

    def status(self, lr: float) -> str | None:
        runs = [run for run in self.runs() if float(run.data.params.get("lr", "nan")) == lr]
        return runs[0].info.status if runs else None


def tune_failures(storage: Path) -> dict[str, int]:
    """Trial name -> how often Tune retried it, over the sweep's Tune experiments."""
    from ray.tune import ExperimentAnalysis

    failures: dict[str, int] = {}
    for path in glob.glob(str(storage / "*")):
        for trial in ExperimentAnalysis(path).trials:
            failures[str(trial)] = failures.get(str(trial), 0) + trial.run_metadata.num_failures
    return failures


def report(fault: str, affected: int, redone: int, lost: int, recover_s: float, command: str) -> None:
    print(f"\nFAULT | {fault} | trials affected {affected} | epochs redone {redone} | metrics lost {lost} | "
          f"time to recover {recover_s:.1f} s | {command}")


def test_sigint_stops_the_sweep_and_a_diverging_trial_fails_at_once(tmp_path: Path) -> None:
    """(c) Ctrl-C on `bnew sweep run`, and (d) a diverging sibling trial, in one sweep."""
    from sweeps.status import sweep_status

    budget, good_lr, bad_lr = 12, 0.01, 1e6
    spec = write_spec(tmp_path, "sigint", budget, [good_lr, bad_lr])
    sweep = Sweep(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}", "sigint")
    run_args = ("sweep", "run", str(spec), "--local", "--max-batches", "2")
    driver = start_bnew(*run_args, cwd=tmp_path)
    wait_for(lambda: sweep.logged_epochs(good_lr) >= 2 and sweep.status(bad_lr) == "FAILED",
             driver, "two epochs of the good trial and the failure of the diverging one")
    sent = time.monotonic()
    driver.send_signal(signal.SIGINT)
    out, err = driver.communicate(timeout=120)
    stop_s = time.monotonic() - sent
    assert driver.returncode == 130, out[-2000:] + err[-3000:]
    assert stop_s < 30, f"took {stop_s:.0f} s to stop"
    assert "interrupted by SIGINT" in err and "Traceback" not in out + err

    good, bad = sweep.trial(good_lr), sweep.trial(bad_lr)
    (parent,) = sweep.runs("sweep")
    assert parent.info.status == "KILLED" and parent.data.tags["bnew.interrupted"] == "SIGINT"
    assert good.info.status == "KILLED" and good.data.tags["bnew.error"].startswith("interrupted (SIGINT)")
    interrupted_at = len(sweep.steps(good.info.run_id))
    assert 2 <= interrupted_at < budget
    # The diverging trial failed in its first epoch, with the reason, and Tune did not retry it.
    assert bad.info.status == "FAILED"
    assert bad.data.tags["bnew.error"].startswith("DivergedError: loss: nan in epoch 0")
    assert sweep.steps(bad.info.run_id) == []
    assert set(tune_failures(tmp_path / ".bnew" / "ray_results" / "sigint").values()) == {0}

    status = sweep_status("sigint", sweep.uri)
    assert status.counts["quantise"] == {"pending": 0, "running": 0, "done": 0, "failed": 1, "interrupted": 1}
    assert {(trial.state, trial.error.split(":")[0]) for trial in status.unfinished} == {
        ("interrupted", "interrupted (SIGINT); `bnew sweep resume` continues it"), ("failed", "DivergedError")}

    started = time.monotonic()
    resumed = bnew("sweep", "resume", *run_args[2:], cwd=tmp_path)
    resume_s = time.monotonic() - started
    assert resumed.returncode == 1, resumed.stdout[-2000:] + resumed.stderr[-3000:]  # the diverging trial again
    assert "1 stages trained" in resumed.stdout
    finished = sweep.trial(good_lr)
    assert finished.info.run_id == good.info.run_id and finished.info.status == "FINISHED"
    assert "bnew.error" not in finished.data.tags
    assert sweep.steps(good.info.run_id) == list(range(budget))  # each epoch once, none lost
    resumed_from = int(finished.data.tags["bnew.resumed_from_epoch"])
    assert 1 <= resumed_from <= interrupted_at
    assert [run.info.run_id for run in sweep.runs("sweep")] == [parent.info.run_id]
    report("SIGINT on `bnew sweep run`", 1, interrupted_at - resumed_from, 0, stop_s,
           "kill -INT <driver>; bnew sweep resume SPEC --local --max-batches 2")
    report("diverging trial (lr 1e6)", 1, 0, 0, 0.0, "axes.params.lr: [0.01, 1e6]")
    print(f"(stopped {stop_s:.1f} s after SIGINT; resume took {resume_s:.1f} s)")
