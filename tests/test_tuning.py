"""Tuning on a real local Ray with a real MLflow store: Optuna searches `lambda_rate` per cell,
ASHA stops weak trials early, every trial is one MLflow run with the right status, an
interrupted search resumed by `bnew sweep resume` continues without rerunning a finished trial,
and the report and the parent run hold the search's results."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from sweeps.records.sweep_runs import load_sweep
from sweeps.core.spec import parse_spec
from sweeps.core.plan import build_plan
from sweeps.analysis.searches import best_runs_only, summarise
from sweeps.core.schema import CELL_TAG
from sweeps.core.search import tuned_cells
from sweeps.run.tuning import grace_epochs
from tests.servers import sweep_env

STOPPED = "bnew.stopped_early"


def tuned_spec(name: str, budgets: list[int], samples: int, **changes: Any) -> dict[str, Any]:
    """BNEW on digits without a pretrain (one stage per trial), lambda_rate on a log scale."""
    spec = {
        "name": name,
        "axes": {"dataset": ["digits"], "optimiser": ["bnew"], "ablation": ["no_pretrain"], "seed": [0],
                 "budget": budgets,
                 "params": {"optimiser.lambda_rate": {"loguniform": [0.01, 30.0], "samples": 1}}},
        "search": {"algorithm": "optuna", "metric": "val_acc_binary", "mode": "max", "samples": samples},
        "scheduler": {"name": "asha", "grace_epochs": 1, "reduction_factor": 2},
        "base": {"batch_size": 64, "device": "cpu", "data": {"val_size": 300}},
        "optimisers": {"bnew": {"freeze_epochs": 1}},
        "max_concurrent": 2,
        "max_failures": 1,
    }
    spec.update(changes)
    return spec


def bnew_command(*args: str, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "sweeps.cli", *args]


def environment(cwd: Path) -> dict[str, str]:
    return sweep_env(BNEW_PROJECT_DIR=str(cwd))


def bnew(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(bnew_command(*args, cwd=cwd), cwd=cwd, env=environment(cwd), capture_output=True,
                          text=True, timeout=900)


def store(cwd: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{cwd / '.bnew' / 'mlflow.db'}")


def tuned_runs(client: MlflowClient, sweep: str) -> list:
    """The runs of the sweep's tuned cells (every seed)."""
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'")
    return [run for run in runs if CELL_TAG in run.data.tags]


def by_params(runs: list) -> dict[str, list]:
    """The runs by their suggested lambda_rate: one run per seed each."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(run.data.tags["bnew.param.optimiser.lambda_rate"], []).append(run)
    return groups


def best_mean(groups: dict[str, list], seeds: int) -> tuple[str, float]:
    """The params whose runs all finished on every seed with the best mean val_acc_binary."""
    means = {value: sum(run.data.metrics["val_acc_binary"] for run in runs) / len(runs) for value, runs in groups.items()
             if len(runs) == seeds and all(run.info.status == "FINISHED" for run in runs)}
    best = max(means, key=means.get)
    return best, means[best]


def write(cwd: Path, spec: dict[str, Any]) -> Path:
    path = cwd / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_interrupted(cwd: Path, spec_path: Path, sweep: str, finished_before_stop: int) -> subprocess.CompletedProcess:
    """`bnew sweep run`, stopped with SIGINT (Ctrl-C) once `finished_before_stop` trials are FINISHED."""
    process = subprocess.Popen(bnew_command("sweep", "run", str(spec_path), "--local", cwd=cwd), cwd=cwd,
                               env=environment(cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client, deadline = store(cwd), time.time() + 600
    while process.poll() is None and time.time() < deadline:
        time.sleep(0.5)  # a digits trial takes seconds (its actor is reused)
        if (cwd / ".bnew" / "mlflow.db").exists():
            finished = [run for run in tuned_runs(client, sweep) if run.info.status == "FINISHED"]
            if len(finished) >= finished_before_stop:
                process.send_signal(signal.SIGINT)
                break
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def check_search_records(client: MlflowClient, sweep: str, samples: int, seeds: list[int], budget: int) -> list:
    """Every search trial of the budget's cell is one run, FINISHED after its budget or KILLED by ASHA
    (tagged) before it, and each suggested lambda_rate ran once on every seed."""
    runs = [run for run in tuned_runs(client, sweep) if run.data.tags["bnew.budget"] == str(budget)]
    trials = samples * len(seeds)
    assert len(runs) == trials, [run.info.run_name for run in runs]
    assert len({run.data.tags["bnew.stage_key"] for run in runs}) == trials
    assert len({run.info.run_name for run in runs}) == trials
    groups = by_params(runs)
    assert len(groups) == samples
    for value, group in groups.items():
        assert sorted(int(run.data.tags["bnew.seed"]) for run in group) == seeds, value
    for run in runs:
        epochs = len(client.get_metric_history(run.info.run_id, "val_acc_binary"))
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc_binary")]
        assert len(set(steps)) == len(steps), f"{run.info.run_name}: an epoch logged twice"
        if STOPPED in run.data.tags:
            assert run.info.status == "KILLED" and epochs < budget, run.info.run_name
        else:
            assert run.info.status == "FINISHED" and epochs == budget, (run.info.run_name, run.info.status, epochs)
    return runs


def test_the_default_grace_lets_a_freezing_optimiser_reach_its_first_frozen_epoch() -> None:
    """BNEW's binary accuracy before its freeze says little about its end: by default its trials
    are judged first after the first frozen epoch; STE's after epoch 1; a set grace_epochs rules."""
    spec = tuned_spec("grace", [6], 4, optimisers={"bnew": {"freeze_epochs": 2}}, scheduler={"name": "asha"})
    spec["axes"].update(optimiser=["bnew", "ste"], params={"lr": {"loguniform": [0.001, 0.1], "samples": 1}})
    cells = {cell.label: cell.templates[0] for cell in tuned_cells(build_plan(parse_spec(spec, "spec")))}
    assert {label: grace_epochs(parse_spec(spec, "spec"), template) for label, template in cells.items()} == {
        "grace/bnew/no_pretrain": 5, "grace/ste/no_pretrain": 1}
    for set_grace, expected in ((2, 2), (9, 6)):
        spec["scheduler"]["grace_epochs"] = set_grace
        assert {grace_epochs(parse_spec(spec, "spec"), template) for template in cells.values()} == {expected}


@pytest.mark.slow
def test_optuna_with_asha_stops_early_records_each_trial_once_and_resumes(tmp_path: Path) -> None:
    """CI-sized: one cell, 7 suggestions of 4 epochs, each on seeds 0 and 1, 2 trials at a time;
    Ctrl-C once 2 trials finished (with trials left to start), then `bnew sweep resume` completes the
    search (about 2 minutes on 2 quiet cores)."""
    samples, seeds, budget = 7, [0, 1], 4
    spec = tuned_spec("tune-ci", [budget], samples)
    spec["axes"]["seed"] = seeds
    path = write(tmp_path, spec)
    first = run_interrupted(tmp_path, path, "tune-ci", finished_before_stop=2)
    assert "Traceback" not in first.stderr, first.stderr[-3000:]
    client = store(tmp_path)
    before = {run.info.run_id: run for run in tuned_runs(client, "tune-ci") if run.info.status == "FINISHED"}
    assert len(before) >= 2 and len(tuned_runs(client, "tune-ci")) < samples * len(seeds), first.stdout[-3000:]

    resumed = bnew("sweep", "resume", str(path), "--local", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stdout + resumed.stderr and "ERROR" not in resumed.stdout + resumed.stderr
    assert f"; {samples * len(seeds)} search trials in 1 cell (" in resumed.stdout, resumed.stdout[-2000:]
    runs = check_search_records(client, "tune-ci", samples, seeds, budget)
    after = {run.info.run_id: run for run in runs}
    for run_id, run in before.items():  # finished before the stop: not trained again
        assert after[run_id].info.end_time == run.info.end_time and after[run_id].info.status == "FINISHED"
    assert any(STOPPED in run.data.tags for run in runs), "ASHA stopped no trial"

    # The search's history on the parent run: trials, Optuna's own study (all samples told), plots.
    (parent,) = client.search_runs([client.get_experiment_by_name("tune-ci").experiment_id], "tags.`bnew.role` = 'sweep'")
    folder = "tuning/tune-ci_bnew_no_pretrain"
    listed = {item.path for item in client.list_artifacts(parent.info.run_id, folder)}
    assert {f"{folder}/trials.csv", f"{folder}/optuna_study.csv", f"{folder}/optimiser.lambda_rate.png"} <= listed
    study = Path(client.download_artifacts(parent.info.run_id, f"{folder}/optuna_study.csv", str(tmp_path)))
    study_frame = pd.read_csv(study)  # every suggestion told to Optuna once (its seeds' mean), with the params MLflow has
    (lambda_column,) = [column for column in study_frame if column.startswith("params_")]
    assert len(study_frame) == samples and set(study_frame["state"]) == {"COMPLETE"}
    groups = by_params(runs)
    assert sorted(study_frame[lambda_column]) == pytest.approx(sorted(float(value) for value in groups))
    for _, told in study_frame.iterrows():  # the mean over the seeds' last reported values
        (group,) = [group for value, group in groups.items() if float(value) == pytest.approx(told[lambda_column])]
        assert told["value"] == pytest.approx(sum(run.data.metrics["val_acc_binary"] for run in group) / len(seeds))

    # status and the report count stopped trials apart from failed ones, and name the best params.
    status = bnew("sweep", "status", "tune-ci", cwd=tmp_path)
    assert status.returncode == 0 and "stopped" in status.stdout and "tuned quantise" in status.stdout, status.stdout
    sweep = load_sweep(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}", "tune-ci")
    (summary,) = summarise(sweep.trials, parse_spec(spec, "spec"))
    stopped = sum(STOPPED in run.data.tags for run in runs)
    assert (summary.trials, summary.samples, summary.seeds, summary.stopped, summary.failed) == (
        samples * len(seeds), samples, len(seeds), stopped, 0)
    best, mean = best_mean(groups, len(seeds))
    assert summary.best_val == pytest.approx(mean)
    assert summary.best_params == {"optimiser.lambda_rate": best}

    # The report's tables keep the best params on both seeds and leave the other search trials out.
    kept = best_runs_only(sweep.trials, parse_spec(spec, "spec"))
    assert sorted(kept["run_id"]) == sorted(run.info.run_id for run in groups[best])


@pytest.mark.slow
@pytest.mark.long
def test_optuna_finds_a_lambda_rate_as_good_as_a_6_point_log_grid(tmp_path: Path) -> None:
    """The issue's full check (too long for CI, so `long`: 72 search trials and 36 grid trials): two
    cells (budgets 4 and 6) after a shared pretrain per seed, 12 Optuna suggestions each, every
    suggestion trained on seeds 0-2; ASHA (its default grace: up to BNEW's first frozen epoch) stops
    some; per cell, the best lambda_rate's mean validation accuracy over the seeds is within 2
    points of the best mean of a 6-point log grid over the same range and seeds.

    Why the seeds' mean: one digits run's binary validation accuracy moves by 3-6 points between
    seeds and between neighbouring rates (300 validation images), more than the 2 points allowed;
    a single-seed search once lost 87.7 to the grid's lucky 90.0. Why the grace: before the freeze,
    BNEW's binary accuracy is near chance for the small rates that end best (lambda_rate 0.01-0.3
    read 9-34% for four of six epochs, then 83-92%), so earlier rungs stop the winners."""
    samples, budgets, seeds = 12, [4, 6], [0, 1, 2]
    shared = {"phases": {"pretrain": {"epochs": 4}}, "optimisers": {"bnew": {"freeze_epochs": 2}},
              "base": {"batch_size": 16, "device": "cpu", "data": {"val_size": 300}}}
    spec = tuned_spec("tune-full", budgets, samples, scheduler={"name": "asha", "reduction_factor": 2}, **shared)
    spec["axes"].update(ablation=["baseline"], seed=seeds)
    tuned = bnew("sweep", "run", str(write(tmp_path, spec)), "--local", cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    grid_values = [0.01 * (3000 ** (i / 5)) for i in range(6)]  # 0.01 ... 30, log-spaced
    grid = tuned_spec("grid-full", budgets, samples, search={"algorithm": "grid"}, **shared)
    grid["axes"].update(ablation=["baseline"], seed=seeds, params={"optimiser.lambda_rate": grid_values})
    del grid["scheduler"]
    ran = bnew("sweep", "run", str(write(tmp_path, grid)), "--local", cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "stages reused" in ran.stdout and "3 stages reused" in ran.stdout, ran.stdout  # the pretrains

    client = store(tmp_path)
    runs = [run for budget in budgets for run in check_search_records(client, "tune-full", samples, seeds, budget)]
    assert len(runs) == len(tuned_runs(client, "tune-full")) == samples * len(seeds) * len(budgets)
    assert any(STOPPED in run.data.tags for run in runs), "ASHA stopped no trial"
    summaries = {s.cell: s for s in summarise(load_sweep(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}", "tune-full").trials,
                                                 parse_spec(spec, "spec"))}
    grid_runs = client.search_runs([client.get_experiment_by_name("grid-full").experiment_id], "tags.`bnew.role` = 'trial'")
    for budget in budgets:
        grid_value, grid_best = best_mean(by_params([run for run in grid_runs if run.data.tags["bnew.budget"] == str(budget)
                                                     and run.data.tags["bnew.stage"] == "quantise"]), len(seeds))
        found = summaries[f"tune-full/bnew/baseline/budget{budget}"]
        print(f"budget {budget}: search best lambda_rate {found.best_params} mean {found.best_val:.2f} "
              f"({found.stopped} of {found.trials} trials stopped); grid best {grid_value} mean {grid_best:.2f}")
        assert found.best_val is not None and not math.isnan(found.best_val)
        assert found.best_val >= grid_best - 2.0, (budget, found.best_val, grid_best)
