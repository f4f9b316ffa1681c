"""The demo sweep (shortened) against a real `mlflow server`, looked at in MLflow's own UI in
headless Chromium: the link the run prints opens the experiment on its runs table with the
nested trial runs under their readable names, their dataset, source and model; the compare view
plots the axes as parallel coordinates (`make images` takes the README's screenshots of both)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import pytest
from mlflow import MlflowClient

from screens import browser_page, show_nested_runs, show_parallel_coordinates
from servers import mlflow_server
from sweeps.records.links import experiment_page
from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec

pytestmark = pytest.mark.debian("chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-ui")) as url:
        yield url


@pytest.fixture(scope="module")
def demo(server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[MlflowClient, str]:
    """The demo sweep, 1 epoch of 2 batches per stage, in-process (--debug), logged to the server."""
    cwd = tmp_path_factory.mktemp("demo")
    env = {**{k: v for k, v in os.environ.items() if k not in ("BNEW_SWEEP_FAULT", "RAY_ADDRESS")},
           "MLFLOW_TRACKING_URI": server, "BNEW_STORAGE_PATH": str(cwd / "ray_results")}
    result = subprocess.run([sys.executable, "-m", "sweeps.cli", "sweep", "run", "demo", "--debug", "--max-epochs", "1",
                             "--max-batches", "2"], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(server)
    experiment_id = client.get_experiment_by_name("demo").experiment_id
    link = experiment_page(server, experiment_id)
    assert link in result.stdout  # where to look, printed by the run
    return client, experiment_id


@pytest.fixture(scope="module")
def page() -> Iterator:
    with browser_page() as page:
        yield page


def test_experiment_page_lists_the_nested_runs_with_dataset_source_and_model(demo, server, page, tmp_path) -> None:
    client, experiment_id = demo
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    names = sorted(stage.name for stage in build_plan(load_spec("demo"), "demo", 1, 2).stages.values())
    main = show_nested_runs(page, experiment_page(server, experiment_id), names,  # the link the run printed
                            ["test_acc_binary"])
    text = main.inner_text()
    assert "GenAI" not in page.url and "Traces" not in text.split("Run Name")[1]
    assert "bnew sweep run demo" in text  # the Source column
    assert "digits" in text  # the Dataset column
    assert "test_acc_binary" in text  # a metric's column, added
    main.screenshot(path=str(tmp_path / "mlflow-runs.png"))
    assert (tmp_path / "mlflow-runs.png").stat().st_size > 20_000


def test_compare_view_plots_the_axes_as_parallel_coordinates(demo, server, page, tmp_path) -> None:
    client, experiment_id = demo
    runs = client.search_runs([experiment_id], "tags.`bnew.stage` = 'quantise'")
    assert len(runs) == 8
    plot = show_parallel_coordinates(page, server, experiment_id, [run.info.run_id for run in runs],
                                     ["axis.optimiser", "axis.seed"], ["test_acc_binary"])
    for optimiser in ("bmd", "bnew", "bop", "ste"):
        plot.locator("svg text", has_text=optimiser).first.wait_for()
    plot.screenshot(path=str(tmp_path / "mlflow-parallel-coordinates.png"))
    assert (tmp_path / "mlflow-parallel-coordinates.png").stat().st_size > 10_000
