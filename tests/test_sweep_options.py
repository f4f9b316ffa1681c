"""What a user changes from the command line: `--set` over a preset, validated as its YAML and
recorded in the sweep's spec artifact; `bnew sweep show`; a plan on a machine without the data;
and a grid's size counted before any stage is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from sweeps.cli import app
from sweeps.core.plan import build_plan, grid_points
from sweeps.core.search import planned_counts, trial_count
from sweeps.core.spec import PRESET_DIR, load_spec, parse_spec, preset_names


@pytest.fixture(autouse=True)
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("BNEW_DATA_DIR", str(tmp_path))
    for variable in ("MLFLOW_TRACKING_URI", "BNEW_STORAGE_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def test_set_changes_a_preset_as_its_yaml_would() -> None:
    spec = load_spec("demo", {"resources.gpu": 0, "axes.seed": [0, 1, 2], "base.batch_size": 256,
                              "axes.params.optimiser.lambda_rate": [0.1, 1.0]})
    assert spec.resources.gpu == 0 and spec.axes.seed == [0, 1, 2] and spec.base["batch_size"] == 256
    assert spec.base["device"] == "cpu"  # a mapping merges: the rest of base stays
    assert spec.axes.params == {"optimiser.lambda_rate": [0.1, 1.0]}  # one param, not optimiser -> lambda_rate


@pytest.mark.parametrize("setting, message", [
    ("axes.seed=[true]", "axes.seed.0: Input should be a valid integer, got true"),
    ("base.batchsize=3", "base.batchsize: not a trainer setting"),
    ("resources.gpu=-1", "resources.gpu: Input should be greater than or equal to 0"),
    ("axes.seed", "--set 'axes.seed': expected KEY=VALUE"),
])
def test_a_bad_set_is_one_line_naming_the_key(setting: str, message: str) -> None:
    for command in (["sweep", "plan", "demo", "--no-lookup"], ["sweep", "run", "demo", "--debug"]):
        result = CliRunner().invoke(app, [*command, "--set", setting])
        assert result.exit_code == 2 and result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_the_set_spec_is_the_one_recorded_in_mlflow(project: Path) -> None:
    env = {**os.environ, "BNEW_PROJECT_DIR": str(project)}
    result = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "run", "demo", "--debug", "--max-epochs", "1",
                             "--max-batches", "1", "--set", "axes.optimiser=[ste]", "--set", "axes.seed=[7]",
                             "--set", "name=demo-set"], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(f"sqlite:///{project}/.bnew/mlflow.db")
    experiment = client.get_experiment_by_name("demo-set")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'sweep'")
    stored = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "spec.yaml", str(project))).read_text())
    assert stored["axes"]["optimiser"] == ["ste"] and stored["axes"]["seed"] == [7]
    trials = client.search_runs([experiment.experiment_id], "tags.`bnew.stage` = 'quantise'")
    assert [run.info.run_name for run in trials] == ["demo-set/ste/baseline/seed7"]  # the grid label is the name


def test_show_prints_a_preset_and_with_set_the_spec_it_makes() -> None:
    shown = CliRunner().invoke(app, ["sweep", "show", "paper-table2"])
    assert shown.exit_code == 0 and shown.stdout == (PRESET_DIR / "paper-table2.yaml").read_text()
    changed = CliRunner().invoke(app, ["sweep", "show", "demo", "--set", "resources.gpu=0.5"])
    assert changed.exit_code == 0 and yaml.safe_load(changed.stdout)["resources"]["gpu"] == 0.5
    assert parse_spec(yaml.safe_load(changed.stdout), "shown").name == "demo"


def test_a_plan_without_the_data_lists_what_is_missing_and_run_refuses(project: Path) -> None:
    plan = CliRunner().invoke(app, ["sweep", "plan", "paper-table2", "--no-lookup"])
    assert plan.exit_code == 0, plan.output
    assert "115 trials" in plan.stdout
    assert f"datasets.cifar100.root: {project}/data/cifar100 is not a directory" in plan.stdout
    assert "not on this machine; checked where the sweep runs" in plan.stdout
    elsewhere = project / "mounted"
    (elsewhere / "data" / "cifar100").mkdir(parents=True)
    found = CliRunner().invoke(app, ["sweep", "plan", "paper-table2", "--no-lookup", "--data-dir", str(elsewhere)])
    assert found.exit_code == 0 and "not on this machine" not in found.stdout
    os.environ["BNEW_DATA_DIR"] = str(project)  # --data-dir set it for its own process; the fixture's again
    refused = CliRunner().invoke(app, ["sweep", "run", "paper-table2", "--local", "--yes"])
    assert refused.exit_code == 2 and "datasets.cifar100.root" in refused.stderr


SEARCH_SPEC = {"name": "searched", "axes": {"optimiser": ["bnew", "ste"], "seed": [0, 1, 2], "budget": [3, 5],
               "params": {"optimiser.lambda_rate": {"loguniform": [0.01, 10.0], "samples": 1}}},
               "search": {"algorithm": "optuna", "samples": 7}, "base": {"data": {"val_size": 100}},
               "exclude": [{"optimiser": "ste", "seed": 2}], "include": [{"optimiser": "real", "ablation": "baseline"}]}


@pytest.mark.parametrize("name", [*preset_names(), "searched"])
def test_the_count_from_grid_points_is_the_plans(name: str) -> None:
    spec = parse_spec(SEARCH_SPEC, "searched") if name == "searched" else load_spec(name)
    points = grid_points(spec)
    assert trial_count(spec, points) == planned_counts(build_plan(spec, name, points=points)).trials


@pytest.mark.parametrize("command", [["sweep", "plan", "demo"], ["sweep", "status", "demo"], ["sweep", "report", "demo"]])
def test_a_dead_tracking_server_is_one_line(command: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = "http://127.0.0.1:9"  # nothing listens there
    result = CliRunner().invoke(app, [*command, "--tracking-uri", dead] if command[1] != "plan" else command,
                                env={"MLFLOW_TRACKING_URI": dead})
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: tracking_uri: {dead} is not reachable (") and result.stderr.count("\n") == 1
