"""The demo sweep (shortened) against a real `mlflow server`, looked at in MLflow's own UI in
headless Chromium: the link the run prints opens the experiment on its runs table with the
nested trial runs under their readable names, their dataset, source and model; the compare view
plots the axes as parallel coordinates. Set BNEW_SCREENSHOT_DIR to keep the screenshots (docs/img/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from servers import free_port, stop
from sweeps.records.links import experiment_page
from sweeps.core.plan import build_plan
from sweeps.core.spec import load_spec

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server with artifact serving, on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow-ui")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a busy 2-core machine needs minutes
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(1)
        yield url
    finally:
        stop(process)


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
def page(server: str) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        page.set_default_timeout(180_000)  # the UI's first load is slow on a busy machine
        yield page
        browser.close()


def screenshot_dir(tmp_path: Path) -> Path:
    return Path(os.environ.get("BNEW_SCREENSHOT_DIR", tmp_path))


def close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel beside every page; it hides the runs."""
    close = page.locator('button[aria-label="Close"]')
    if close.count():
        close.first.click()


def test_experiment_page_lists_the_nested_runs_with_dataset_source_and_model(demo, server, page, tmp_path) -> None:
    client, experiment_id = demo
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    page.goto(experiment_page(server, experiment_id))  # the link the run printed
    page.get_by_text("matching runs").wait_for()
    main = page.locator("main")
    run_names = main.locator('[id^="cell-attributes.`Run Name`"]')  # not the breadcrumb's "demo"
    run_names.get_by_role("link", name="demo", exact=True).wait_for()
    close_assistant(page)
    # The parent run "demo" holds the trials: expand it.
    page.locator('button[data-component-id$="runnamecellrenderer.tsx_46"]').first.click()
    names = sorted(stage.name for stage in build_plan(load_spec("demo"), "demo", 1, 2).stages.values())
    for name in names:
        main.get_by_role("link", name=name, exact=True).wait_for()
    text = main.inner_text()
    assert "GenAI" not in page.url and "Traces" not in text.split("Run Name")[1]
    assert "bnew sweep run demo" in text  # the Source column
    assert "digits" in text  # the Dataset column
    page.wait_for_timeout(1000)
    shots = screenshot_dir(tmp_path)
    main.screenshot(path=str(shots / "mlflow-runs.png"))
    assert (shots / "mlflow-runs.png").stat().st_size > 20_000


def test_compare_view_plots_the_axes_as_parallel_coordinates(demo, server, page, tmp_path) -> None:
    client, experiment_id = demo
    runs = client.search_runs([experiment_id], "tags.`bnew.stage` = 'quantise'")
    assert len(runs) == 8
    query = urllib.parse.urlencode({"runs": json.dumps([run.info.run_id for run in runs]),
                                    "experiments": json.dumps([experiment_id])})
    page.goto(f"{server}/#/compare-runs?{query}")
    plot = page.locator('[id$="content-parallel-coordinates-plot"]')
    plot.get_by_text("Parameters:").wait_for()
    close_assistant(page)
    selects = plot.locator(".du-bois-light-select")
    chosen = selects.locator(".du-bois-light-select-selection-item")
    while chosen.count():  # MLflow's default choices: replace them
        chosen.first.locator(".du-bois-light-select-selection-item-remove").click()
    for select, keys in ((selects.nth(0), ["axis.optimiser", "axis.seed"]), (selects.nth(1), ["test_acc_binary"])):
        for key in keys:
            select.click()
            page.keyboard.type(key)
            page.locator(f'.du-bois-light-select-item-option[title="{key}"]').click()
            page.keyboard.press("Escape")
    for label in ("axis.optimiser", "axis.seed", "test_acc_binary"):  # the plot's axis titles
        plot.locator("svg text", has_text=label).first.wait_for()
    for optimiser in ("bmd", "bnew", "bop", "ste"):
        plot.locator("svg text", has_text=optimiser).first.wait_for()
    page.wait_for_timeout(1000)
    shots = screenshot_dir(tmp_path)
    plot.screenshot(path=str(shots / "mlflow-parallel-coordinates.png"))
    assert (shots / "mlflow-parallel-coordinates.png").stat().st_size > 10_000
