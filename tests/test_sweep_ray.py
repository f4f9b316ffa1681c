"""Sweeps on a real local Ray with a real MLflow store: the demo preset end to end, stage
reuse on a second run, a killed trial retried from its checkpoint, and `bnew sweep resume`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml
from mlflow import MlflowClient

from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec

def bnew(*args: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("BNEW_SWEEP_FAULT", "RAY_ADDRESS")}
    if fault:
        env["BNEW_SWEEP_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def store(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / '.bnew' / 'mlflow.db'}")


def trial_runs(client: MlflowClient, sweep: str) -> list:
    experiment = client.get_experiment_by_name(sweep)
    return client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'")


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_demo_preset_on_local_ray_records_everything_and_reruns_nothing(tmp_path: Path) -> None:
    # The preset as shipped (about a minute and a half on 2 CPU cores).
    first = bnew("sweep", "run", "demo", "--local", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "12 stages trained, 0 reused, 0 failed" in first.stdout
    # A healthy run: no ERROR line (trial outputs stay out of what Tune syncs). Known: Ray may print
    # "Exception ignored ... SystemExit" from a finished trial's actor as it is terminated.
    assert "ERROR" not in first.stdout + first.stderr and "FileNotFoundError" not in first.stdout + first.stderr

    client = store(tmp_path)
    plan = build_plan(load_spec("demo"))
    epochs = {stage.name: stage.epochs for stage in plan.stages.values()}
    (parent,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id], "tags.`bnew.role` = 'sweep'")
    assert parent.info.run_name == "demo" and parent.data.tags["bnew.sweep"] == "demo"
    assert parent.info.status == "FINISHED" and "spec.yaml" in artifact_paths(client, parent.info.run_id)

    runs = trial_runs(client, "demo")
    assert sorted(run.info.run_name for run in runs) == sorted(stage.name for stage in plan.stages.values())
    assert Counter(run.data.tags["bnew.stage"] for run in runs) == {"teacher": 2, "pretrain": 2, "quantise": 8}
    # Prerequisites trained once, each by one run, and every quantise trial of a seed used them.
    assert len({run.data.tags["bnew.stage_key"] for run in runs}) == len(runs)
    for run in runs:
        tags, run_id = run.data.tags, run.info.run_id
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["bnew.sweep"] == "demo" and tags["bnew.grid"] == "demo" and tags["bnew.dataset"] == "digits"
        steps = [m.step for m in client.get_metric_history(run_id, "test_acc_binary")]
        assert steps == list(range(epochs[run.info.run_name]))
        assert {"config.yaml", "model.pt", "checkpoint/checkpoint.pt"} <= artifact_paths(client, run_id)
        assert run.data.params["seed"] == tags["bnew.seed"] and run.data.params["data.name"] == "digits"
    bnew_run = next(run for run in runs if run.info.run_name == "demo/bnew/baseline/seed1")
    assert bnew_run.data.params["optimiser.lambda_rate"] == "5.0"
    assert bnew_run.data.tags["bnew.optimiser"] == "bnew" and bnew_run.data.tags["bnew.distillation"] == "yes"
    assert "final_test_acc_binary" in bnew_run.data.metrics

    second = bnew("sweep", "run", "demo", "--local", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "12 stages reused, 0 to train" in second.stdout and "Ray:" not in second.stdout
    assert len(trial_runs(client, "demo")) == len(runs)

    status = bnew("sweep", "status", "demo", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "quantise │       0 │       0 │    8 │      0" in status.stdout


def write_spec(directory: Path, name: str, max_failures: int) -> Path:
    spec = {
        "name": name,
        "axes": {"dataset": ["digits"], "optimiser": ["bnew"], "seed": [0], "budget": [4]},
        "base": {"batch_size": 64, "device": "cpu"},
        "phases": {"pretrain": {"epochs": 2}},
        "optimisers": {"bnew": {"lambda_rate": 5.0, "freeze_epochs": 1}},
        "max_failures": max_failures,
        "checkpoint": {"every_epochs": 1},  # resumed from the epoch the fault hits
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def the_trial(client: MlflowClient, sweep: str):
    runs = trial_runs(client, sweep)
    assert Counter(run.data.tags["bnew.stage"] for run in runs) == {"pretrain": 1, "quantise": 1}
    return next(run for run in runs if run.data.tags["bnew.stage"] == "quantise")


def test_killed_trial_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "killed", max_failures=1)
    result = bnew("sweep", "run", str(spec), "--local", "--max-batches", "3", cwd=tmp_path, fault="*/bnew/*@1:exit")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trial = the_trial(store(tmp_path), "killed")
    assert trial.info.status == "FINISHED"
    assert int(trial.data.tags["bnew.resumed_from_epoch"]) >= 1  # not from scratch
    steps = [m.step for m in store(tmp_path).get_metric_history(trial.info.run_id, "test_acc_binary")]
    assert sorted(steps) == [0, 1, 2, 3]  # every epoch once, also those retrained after the kill


def test_a_trial_lost_after_recording_itself_is_not_trained_or_recorded_again(tmp_path: Path) -> None:
    """Its process exits once its run is FINISHED in MLflow, before Tune hears that it ended (the
    window a stopped driver leaves open): Tune retries it from its checkpoint, and the retry reports
    the recorded result instead of training a second run."""
    spec = write_spec(tmp_path, "lost", max_failures=1)
    result = bnew("sweep", "run", str(spec), "--local", "--max-batches", "3", cwd=tmp_path, fault="*/bnew/*@recorded")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    trial = the_trial(store(tmp_path), "lost")  # one run per stage
    assert trial.info.status == "FINISHED" and "bnew.resumed_from_epoch" not in trial.data.tags
    steps = [m.step for m in store(tmp_path).get_metric_history(trial.info.run_id, "loss")]
    assert sorted(steps) == [0, 1, 2, 3]


def test_failed_sweep_resumes_from_checkpoints_without_rerunning_finished_stages(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "interrupted", max_failures=0)
    failed = bnew("sweep", "run", str(spec), "--local", "--max-batches", "3", cwd=tmp_path, fault="*/bnew/*@1")
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "failed: interrupted/bnew/baseline/seed0" in failed.stderr
    trial = the_trial(store(tmp_path), "interrupted")
    assert trial.info.status == "FAILED" and "injected failure after epoch 1" in trial.data.tags["bnew.error"]

    resumed = bnew("sweep", "resume", str(spec), "--local", "--max-batches", "3", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    trial = the_trial(store(tmp_path), "interrupted")  # still one pretrain run: not retrained
    assert trial.info.status == "FINISHED" and "bnew.error" not in trial.data.tags
    assert int(trial.data.tags["bnew.resumed_from_epoch"]) >= 1
    steps = [m.step for m in store(tmp_path).get_metric_history(trial.info.run_id, "loss")]
    assert sorted(steps) == [0, 1, 2, 3]


def test_debug_run_needs_no_ray_and_another_sweep_reuses_its_stages(tmp_path: Path) -> None:
    first = bnew("sweep", "run", str(write_spec(tmp_path, "first", 0)), "--debug", "--max-batches", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Ray:" not in first.stdout and "2 stages trained" in first.stdout
    # Same grid under another name: nothing trains, the trials are linked to the trained runs.
    second = bnew("sweep", "run", str(write_spec(tmp_path, "second", 0)), "--debug", "--max-batches", "2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "2 stages reused, 0 to train" in second.stdout
    client = store(tmp_path)
    trained = {run.data.tags["bnew.stage_key"]: run for run in trial_runs(client, "first")}
    for run in trial_runs(client, "second"):
        source = trained[run.data.tags["bnew.stage_key"]]
        assert run.data.tags["bnew.reused_from"] == source.info.run_id
        assert run.info.run_name == source.info.run_name.replace("first/", "second/")
        assert run.data.metrics == source.data.metrics and run.data.params == source.data.params


def test_cluster_runs_need_a_tracking_server(tmp_path: Path) -> None:
    result = bnew("sweep", "run", "demo", "--address", "ray://10.1.2.3:10001", cwd=tmp_path)
    assert result.returncode == 2
    assert "tracking_uri:" in result.stderr and "MLflow server" in result.stderr
    assert not (tmp_path / ".bnew").exists()


def test_stages_on_the_longest_chain_of_epochs_start_first() -> None:
    from sweeps.core.schedule import critical_path_order

    plan = build_plan(load_spec("cifar10-cpu-study"))
    order = [plan.stages[key] for key in critical_path_order(list(plan.stages.values()))]
    position = {stage.key: index for index, stage in enumerate(order)}
    # Chains of epochs: baseline pretrain 2 + quantise 6 = 8; teacher 3 + distilled pretrain 2 +
    # quantise 2 = 7; an ablation's pretrain 2 + quantise 2 = 4. Deepest-first put the teachers last.
    assert [stage.name for stage in order[:6]] == [f"c10study/pretrain/baseline/nodistill/seed{seed}" for seed in range(3)] + [
        f"c10study/teacher/baseline/seed{seed}" for seed in range(3)]
    ablation_pretrains = [position[stage.key] for stage in order
                          if stage.phase == "pretrain" and "/baseline/" not in stage.name]
    assert len(ablation_pretrains) == 9 and min(ablation_pretrains) > position[order[5].key]


def test_scheduler_releases_each_stage_when_its_own_inputs_are_done() -> None:
    from sweeps.run.stage_graph import StageScheduler
    from sweeps.run.trial import SweepContext

    plan = build_plan(load_spec("demo"))
    scheduler = StageScheduler(list(plan.stages.values()), set(), SweepContext("demo", "sqlite:///x", "1", "p"))

    def suggest(trial_id: str) -> str | None:
        config = scheduler.suggest(trial_id)
        return config if config in (None, scheduler.FINISHED) else config["stage"]["roles"][0]["name"]

    assert [suggest("t0"), suggest("t1"), suggest("t2")] == ["demo/teacher/baseline/seed0", "demo/teacher/baseline/seed1", None]
    scheduler.on_trial_complete("t0")
    # Seed 0's pretrain starts while seed 1's teacher still trains: no barrier between levels.
    assert suggest("p0") == "demo/pretrain/baseline/seed0" and suggest("x") is None
    scheduler.on_trial_complete("p0")
    quantise_seed0 = {suggest(f"q{i}") for i in range(4)}
    assert quantise_seed0 == {f"demo/{optimiser}/baseline/seed0" for optimiser in ("ste", "bmd", "bop", "bnew")}
    scheduler.on_trial_complete("t1", error=True)  # seed 1's teacher fails: its dependents never start
    for i in range(4):
        scheduler.on_trial_complete(f"q{i}")
    assert suggest("end") == scheduler.FINISHED
