"""The Python API (`import sweeps`): a user's script runs the demo with `sweeps.load` and
`sweeps.run` on its own local Ray; `sweeps.results` and `sweeps.report` read it back; MLflow's own
`search_runs` and `mlflow.pytorch.load_model` agree with them. Also that the API refuses what the
CLI refuses, with the same messages (what `import sweeps` loads: tests/test_layers.py)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import mlflow
import pytest
import torch
import yaml

import sweeps
from bnew_core.config import BnewError, build_trial_config
from bnew_core.train import accuracy_on_test_split
from tests.servers import sweep_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, sweeps
spec = sweeps.load("demo", {"name": "api-demo", "axes.seed": [0, 1]})
planned = sweeps.plan(spec)
outcome = sweeps.run(spec, local=True, max_epochs=2, max_batches=4)
print(json.dumps({"stages": len(planned.stages), "trained": len(outcome.trained), "complete": outcome.complete}))
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, str]:
    """The demo run by a user's script: its tracking URI, its printed summary and its stderr."""
    project = tmp_path_factory.mktemp("api")
    env = sweep_env(BNEW_PROJECT_DIR=str(project), PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return f"sqlite:///{project / '.bnew' / 'mlflow.db'}", json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_a_script_runs_the_demo_and_its_progress_is_logged_once(demo) -> None:
    _, summary, log = demo
    assert summary == {"stages": 12, "trained": 12, "complete": True}
    lines = log.splitlines()
    done = [line for line in lines if line.startswith("done   api-demo/")]
    assert len(done) == 12 and len(set(done)) == 12  # each stage's line once, through the `sweeps` logger
    assert "Traceback" not in log and "Configuration for experiment" not in log  # nor Tune's own tables


def test_results_has_a_row_per_trial_as_mlflow_search_runs_has(demo, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _, _ = demo
    frame = sweeps.results("api-demo", uri)
    assert len(frame) == 12 and set(frame.state) == {"FINISHED"}
    assert set(frame.optimiser) == {"teacher", "pretrain", "ste", "bmd", "bop", "bnew"} and set(frame.seed) == {"0", "1"}
    assert frame.stage_key.str.len().min() > 0 and frame.model_uri.str.startswith("models:/").all()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # not mlflow.set_tracking_uri: it outlives the test
    theirs = mlflow.search_runs(experiment_names=["api-demo"], filter_string="tags.`bnew.role` = 'trial'")
    assert sorted(theirs["run_id"]) == sorted(frame.run_id)
    mine = frame.set_index("run_id")["final_test_acc_binary"]
    assert (theirs.set_index("run_id")["metrics.final_test_acc_binary"] == mine[theirs["run_id"]].to_numpy()).all()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread, as Ray ran each 1-CPU trial (OMP_NUM_THREADS=1): the same sums in the
    same order, so a binary activation whose input lies near 0 flips neither there nor here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_model_uri_loads_with_mlflow_and_reaches_its_recorded_accuracy(demo, monkeypatch, tmp_path: Path,
                                                                            one_thread) -> None:
    uri, _, _ = demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    for row in sweeps.results("api-demo", uri, best=False).itertuples():
        config_path = client.download_artifacts(row.run_id, "config.yaml", str(tmp_path / row.run_id))
        config = build_trial_config(yaml.safe_load(Path(config_path).read_text()))
        network = mlflow.pytorch.load_model(row.model_uri).eval()
        # A pretrained model keeps its real-valued weights (its binary accuracy is of their signs);
        # a quantised one holds the binary weights; a teacher is real-valued (both are the same).
        recorded = row.final_test_acc_float if row.stage == "pretrain" else row.final_test_acc_binary
        assert abs(accuracy_on_test_split(network, config) - recorded) < 0.01, row.run_name


def test_report_computes_the_claims_and_tables_without_writing(demo, tmp_path: Path, monkeypatch) -> None:
    uri, _, _ = demo
    monkeypatch.chdir(tmp_path)
    report = sweeps.report("api-demo", uri)
    cells = report.tables_frame
    assert sorted(cells.row) == ["bmd", "bnew", "bop", "ste"] and (cells.n == 2).all()
    assert report.text().startswith("# Sweep report: api-demo")
    figures = report.figures()
    assert sorted(figures) == [f"api-demo_digits_{name}" for name in ("accuracy", "bars", "dist_lambda", "flips")]
    assert len(figures["api-demo_digits_bars"].axes[0].patches) == 4  # a bar per optimiser
    assert list(tmp_path.iterdir()) == []  # nothing written here
    parent = report.sweep.parent_run_id
    assert mlflow.MlflowClient(uri).list_artifacts(parent, "report") == []  # nor logged


def test_the_api_refuses_what_the_cli_refuses_with_its_messages() -> None:
    with pytest.raises(BnewError, match="axes.sed"):
        sweeps.load("demo", {"axes.sed": [0, 1]})
    huge = sweeps.load("demo", {"axes.seed": list(range(100_000))})
    with pytest.raises(BnewError, match=r"axes.seed has 100000 values"):
        sweeps.plan(huge, lookup=False)


def test_run_and_plan_are_callable_and_still_the_modules_of_those_names() -> None:
    import sweeps.plan as shim  # the old module of the same name
    import sweeps.run.driver as driver  # the layer of the same name
    assert shim.Stage.__module__ == "sweeps.core.plan" and driver.run_sweep.__module__ == "sweeps.run.driver"
    assert list(inspect.signature(sweeps.run).parameters)[:3] == ["spec", "local", "address"]
    assert list(inspect.signature(sweeps.plan).parameters)[:2] == ["spec", "max_epochs"]
    assert sweeps.plan(sweeps.load("demo"), lookup=False).stages.shape[0] == 12
