"""Faults injected into real processes (a real Ray, a real MLflow store): Ctrl-C on the driver,
a diverging trial, the driver killed, a corrupted checkpoint, a worker node killed. Each test
checks that nothing is lost or duplicated and prints a `FAULT` line with its figures (trials
affected, epochs redone, metrics lost, time to recover): run with `-s` to see them."""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from mlflow import MlflowClient

from tests.ray_nodes import wait_for
from tests.servers import descendants, free_port, process_table, sweep_env

pytestmark = pytest.mark.slow
EPOCHS_TO_INTERRUPT, BATCHES_TO_INTERRUPT = 30, "8"
"""Trials the faults hit mid-way: long enough (~1 s an epoch) that they are still training when
the fault lands after their second epoch, whatever the machine's speed."""
TRIAL_PROCESS = "ray::ImplicitFunc"
"""How `ps` names a process running a Tune trial (Ray's process title for a function trainable)."""
REPO = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def write_spec(directory: Path, name: str, budget: int, lrs: list[float], pretrain: bool = False) -> Path:
    """STE trials, one per lr, from a 1-epoch pretrained model or (by default) from scratch."""
    spec = {
        "name": name,
        "axes": {"dataset": ["digits"], "optimiser": ["ste"], "ablation": ["baseline" if pretrain else "no_pretrain"],
                 "seed": [0], "budget": [budget], "params": {"lr": lrs}},
        "base": {"batch_size": 64, "device": "cpu"},
        "phases": {"pretrain": {"epochs": 1}},
        "max_failures": 2,
        "checkpoint": {"every_epochs": 1},  # faults hit mid-trial: resume from the epoch before
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bnew(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env or sweep_env(),
                          capture_output=True, text=True, timeout=900)  # a hang; beside busy loops a resume took 485 s


class Driver:
    """`bnew ...` running in the background, its output in files (a full pipe would block it)."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None):
        self.out, self.err = cwd / "driver.out", cwd / "driver.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd,
                                            env=env or sweep_env(), stdout=out, stderr=err, text=True)

    def output(self) -> tuple[str, str]:
        return self.out.read_text(), self.err.read_text()

    def wait(self, timeout: float) -> tuple[str, str]:
        """Its output once it has ended; still running after `timeout` s, it hangs: killed, and the
        test fails with its output."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(60)
            out, err = self.output()
            pytest.fail(f"still running {timeout:.0f} s on: {out[-2000:]} {err[-3000:]}")
        return self.output()

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                out, err = self.output()
                pytest.fail(f"the sweep ended before {what}: {out[-2000:]} {err[-3000:]}")
            if time.monotonic() > deadline:
                self.process.kill()
                out, err = self.wait(60)
                pytest.fail(f"timed out waiting for {what}: {out[-2000:]} {err[-3000:]}")
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

    def phase_runs(self, phase: str) -> list:
        return [run for run in self.runs() if run.data.tags["bnew.stage"] == phase]


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
    from sweeps.analysis.status import sweep_status

    budget, good_lr, bad_lr = 6, 0.01, 1e6
    spec = write_spec(tmp_path, "sigint", budget, [good_lr, bad_lr])
    sweep = Sweep(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}", "sigint")
    run_args = ("sweep", "run", str(spec), "--local", "--max-batches", BATCHES_TO_INTERRUPT)
    # The good trial waits after its second epoch (a gate that never opens) until the SIGINT stops
    # it: mid-way on any machine, and its resume trains 4 epochs, not the 28 left of a 30-epoch
    # race (over 600 s beside two busy loops).
    driver = Driver(*run_args, cwd=tmp_path, env=sweep_env(BNEW_SWEEP_FAULT=f"*/lr={good_lr}/*@1:hold",
                                                           BNEW_SWEEP_FAULT_GATE=str(tmp_path / "never")))
    driver.wait_for(lambda: sweep.logged_epochs(good_lr) >= 2 and sweep.status(bad_lr) == "FAILED",
                    "two epochs of the good trial and the failure of the diverging one")
    signalled_at = sweep.logged_epochs(good_lr)
    sent = time.monotonic()
    driver.process.send_signal(signal.SIGINT)
    out, err = driver.wait(timeout=600)  # a hang; how soon it stopped is the FAULT line's figure
    stop_s = time.monotonic() - sent
    assert driver.process.returncode == 130, out[-2000:] + err[-3000:]
    assert "interrupted by SIGINT" in err and "Traceback" not in out + err, out[-3000:] + "\n=====\n" + err[-3000:]

    good, bad = sweep.trial(good_lr), sweep.trial(bad_lr)
    (parent,) = sweep.runs("sweep")
    assert parent.info.status == "KILLED" and parent.data.tags["bnew.interrupted"] == "SIGINT"
    assert good.info.status == "KILLED" and good.data.tags["bnew.error"].startswith("interrupted (SIGINT)")
    interrupted_at = len(sweep.steps(good.info.run_id))
    assert signalled_at == interrupted_at == 2  # stopped while it waited: not left to train its budget out
    # The diverging trial failed in its first epoch, with the reason, and Tune did not retry it.
    assert bad.info.status == "FAILED"
    assert bad.data.tags["bnew.error"].startswith("DivergedError: loss: nan in epoch 0")
    assert sweep.steps(bad.info.run_id) == []
    assert set(tune_failures(tmp_path / ".bnew" / "ray_results" / "sigint").values()) == {0}

    status = sweep_status("sigint", sweep.uri)
    assert status.counts["quantise"] == {"pending": 0, "running": 0, "done": 0, "failed": 1, "interrupted": 1, "stopped": 0}
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
           "kill -INT <driver>; bnew sweep resume SPEC --local --max-batches 8")
    report("diverging trial (lr 1e6)", 1, 0, 0, 0.0, "axes.params.lr: [0.01, 1e6]")
    print(f"(stopped {stop_s:.1f} s after SIGINT; resume took {resume_s:.1f} s)")


# --- on a loopback cluster: a Ray head, two worker nodes, an MLflow server ---------------------
@dataclass
class Cluster:
    state: Path
    env: dict[str, str]

    def sweep_env(self, project: Path) -> dict[str, str]:
        project.mkdir(exist_ok=True)
        return {**self.env, "BNEW_PROJECT_DIR": str(project), "BNEW_STORAGE_PATH": str(project / "storage")}

    def nodes(self, processes: dict[int, tuple[int, str]]) -> list[list[int]]:
        """Each Ray node of the cluster: its raylet, then every process below it."""
        ray_tmpdir = (self.state / "ray_tmpdir").read_text().strip()
        return [[pid, *descendants(pid, processes)] for pid, (_, args) in processes.items()
                if "/raylet" in args.split(" ", 1)[0] and ray_tmpdir in args]

    def trial_processes(self) -> list[int]:
        """The processes of the cluster that run a trial."""
        processes = process_table()
        return [pid for node in self.nodes(processes) for pid in node[1:] if processes[pid][1].startswith(TRIAL_PROCESS)]

    def worker_node_with_trial(self) -> list[int]:
        """The raylet of a worker node running a trial, and every process below it."""
        processes = process_table()
        return next((node for node in self.nodes(processes)
                     if any(processes[pid][1].startswith(TRIAL_PROCESS) for pid in node[1:])), [])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("cluster")
    env = {**sweep_env(), "PATH": f"{BIN}:{os.environ['PATH']}", "WORKERS": "2", "CPUS_PER_NODE": "1",
           **{name: str(free_port()) for name in ("RAY_PORT", "DASHBOARD_PORT", "RAY_CLIENT_PORT", "MLFLOW_PORT")}}
    started = subprocess.run(["bash", str(REPO / "cluster" / "start_local.sh"), str(state)], env=env,
                             capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        with pytest.MonkeyPatch.context() as patch:  # this process reads MLflow's server too
            for name, value in exports.items():
                if name.startswith("MLFLOW_"):
                    patch.setenv(name, value)
            yield Cluster(state, {**env, **exports})
    finally:
        subprocess.run(["bash", str(REPO / "cluster" / "stop_local.sh"), str(state)], env=env, timeout=120)


@pytest.mark.long
def test_killed_driver_resumes_and_a_corrupted_checkpoint_falls_back(cluster: Cluster, tmp_path: Path) -> None:
    """(b) the driver SIGKILLed mid-sweep, then (e) the newest checkpoint of a trial truncated."""
    import torch

    budget, lrs = EPOCHS_TO_INTERRUPT, [0.01, 0.02]
    env = cluster.sweep_env(tmp_path / "project")
    spec = write_spec(tmp_path, "killed-driver", budget, lrs, pretrain=True)
    sweep = Sweep(env["MLFLOW_TRACKING_URI"], "killed-driver")
    run_args = ("sweep", "run", str(spec), "--max-batches", BATCHES_TO_INTERRUPT)
    driver = Driver(*run_args, cwd=tmp_path, env=env)
    # Both trials mid-way: the first one's actor is the pretrain's (reused), the second one's starts afresh.
    driver.wait_for(lambda: min(sweep.logged_epochs(lr) for lr in lrs) >= 3, "three epochs of both trials")
    driver.process.kill()
    driver.wait(60)
    wait_for(lambda: not cluster.trial_processes(), "the cluster to end the dead driver's trials", timeout=300)
    (pretrain,) = sweep.phase_runs("pretrain")
    (parent,) = sweep.runs("sweep")
    before = {run.info.run_id: len(sweep.steps(run.info.run_id)) for run in sweep.phase_runs("quantise")}

    # Truncate the newest checkpoint of the most advanced trial: the resume must take the one before.
    trial_dirs = glob.glob(str(Path(env["BNEW_STORAGE_PATH"]) / "killed-driver" / "*" / "killed-driver_ste_*"))
    kept = max((sorted(glob.glob(f"{trial}/checkpoint_*")) for trial in trial_dirs), key=len)
    assert len(kept) >= 2, kept  # CheckpointConfig(num_to_keep=2)
    newest = Path(kept[-1]) / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    good_epoch = torch.load(Path(kept[-2]) / "checkpoint.pt", weights_only=True)["epoch"]

    started = time.monotonic()
    resumed = bnew("sweep", "resume", *run_args[2:], cwd=tmp_path, env=env)
    resume_s = time.monotonic() - started
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert [run.info.run_id for run in sweep.runs("sweep")] == [parent.info.run_id]
    assert sweep.runs("sweep")[0].info.status == "FINISHED"
    (pretrain_after,) = sweep.phase_runs("pretrain")  # finished stage: not run again
    assert pretrain_after.info.run_id == pretrain.info.run_id and pretrain_after.info.end_time == pretrain.info.end_time
    trials = sweep.phase_runs("quantise")
    assert {run.info.run_id for run in trials} == set(before)  # each trial continued its own run
    redone = 0
    for run in trials:
        assert run.info.status == "FINISHED"
        assert sweep.steps(run.info.run_id) == list(range(budget))  # each epoch once, none lost
        resumed_from = int(run.data.tags.get("bnew.resumed_from_epoch", 0))
        redone += before[run.info.run_id] - resumed_from
    (corrupted,) = [run for run in trials if "bnew.checkpoint_corrupt" in run.data.tags]
    assert "does not match its checksum" in corrupted.data.tags["bnew.checkpoint_corrupt"]
    assert int(corrupted.data.tags["bnew.resumed_from_epoch"]) == good_epoch + 1
    report("driver SIGKILLed mid-sweep (+ newest checkpoint of one trial truncated)", len(before), redone, 0,
           resume_s, f"kill -9 <driver>; bnew sweep resume SPEC --max-batches {BATCHES_TO_INTERRUPT} (RAY_ADDRESS: loopback cluster)")


@pytest.mark.long
def test_a_lost_worker_node_costs_no_metrics(cluster: Cluster, tmp_path: Path) -> None:
    """(a) a worker node's raylet and its trial processes SIGKILLed mid-sweep."""
    budget, lrs = EPOCHS_TO_INTERRUPT, [0.01, 0.02]
    env = cluster.sweep_env(tmp_path / "project")
    spec = write_spec(tmp_path, "lost-node", budget, lrs)
    sweep = Sweep(env["MLFLOW_TRACKING_URI"], "lost-node")
    driver = Driver("sweep", "run", str(spec), "--max-batches", BATCHES_TO_INTERRUPT, cwd=tmp_path, env=env)
    driver.wait_for(lambda: min(sweep.logged_epochs(lr) for lr in lrs) >= 2, "two epochs of both trials")
    node = cluster.worker_node_with_trial()
    assert node, "no worker node runs a trial"
    at_kill = {run.info.run_id: len(sweep.steps(run.info.run_id)) for run in sweep.runs()}
    killed = time.monotonic()
    for pid in node:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    out, err = driver.wait(timeout=600)
    finish_s = time.monotonic() - killed
    assert driver.process.returncode == 0, out[-2000:] + err[-3000:]
    trials = sweep.runs()
    assert len(trials) == len(lrs) and len({run.data.tags["bnew.stage_key"] for run in trials}) == len(lrs)
    for run in trials:
        assert run.info.status == "FINISHED"
        assert sweep.steps(run.info.run_id) == list(range(budget))  # each epoch once, none lost
    (affected,) = [run for run in trials if "bnew.resumed_from_epoch" in run.data.tags]
    resumed_from = int(affected.data.tags["bnew.resumed_from_epoch"])
    assert resumed_from >= 1  # from its checkpoint, not from scratch
    report("worker node SIGKILLed (raylet + its processes)", 1, at_kill[affected.info.run_id] - resumed_from, 0, finish_s,
           "kill -9 <worker raylet and its children>; the sweep finishes by itself")
