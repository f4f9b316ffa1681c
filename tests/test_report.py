"""Sweep reports against a real MLflow store (sqlite) with known metric values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats
from statsmodels.stats.multitest import multipletests

from bnew_core.config import BnewError
from sweeps.analysis.report import write_report
from sweeps.analysis.tables import ReportError, build_tables
from sweeps.records.sweep_runs import load_sweep

SWEEP = "table1-mini"
SEEDS = (0, 1, 2)
COLUMNS = {"200/yes": ("200", "yes"), "1000/yes": ("1000", "yes")}
FINAL_ACC = {  # (optimiser, column) -> final test accuracy per seed; (bnew, 1000/yes) has no finished run
    ("ste", "200/yes"): [56.0, 56.4, 55.9],
    ("ste", "1000/yes"): [56.9, 57.1, 56.5],
    ("bnew", "200/yes"): [55.1, 55.6, 55.4],
}
REAL_ACC = [66.8, 67.3]
SPEC = {  # a SweepSpec: (bnew, 1000/yes) is planned, so its lack of a finished run shows as missing
    "name": SWEEP,
    "grid": "table1",
    "axes": {
        "dataset": ["cifar100"], "optimiser": ["ste", "bnew"], "seed": list(SEEDS), "budget": [200, 1000],
        "distillation": [True],
    },
    "include": [{"optimiser": "real", "budget": 200, "distillation": False}],
    "report": {
        "rows": ["optimiser"],
        "columns": ["budget", "distillation"],
        "paper_table": "table1_cifar100_budget",
        "baseline": "ste",
    },
}

UNPLANNED_SWEEP = "table1-unplanned"
TABLE2 = "table2-mini"
TABLE2_ACC = {
    ("baseline", "ste"): [56.2, 55.9, 56.6],
    ("baseline", "bnew"): [55.5, 55.9, 56.1],
    ("regulariser_l1", "bnew"): [54.2, 54.9, 54.4],
}
TABLE2_SPEC = {
    "name": TABLE2,
    "grid": "table2",
    "axes": {"dataset": ["cifar100"], "optimiser": ["ste", "bnew"], "ablation": ["baseline", "regulariser_l1"],
             "seed": [0, 1, 2], "distillation": [True]},
    "exclude": [{"optimiser": "ste", "ablation": "regulariser_l1"}],
    "report": {
        "rows": ["ablation"], "columns": ["optimiser"], "paper_table": "table2_ablation", "baseline": "baseline",
    },
}


def paired(sample: list[float], reference: list[float]) -> float:
    """The oracle for cells whose runs share seeds 0, 1, 2: scipy's paired t-test."""
    return stats.ttest_rel(sample, reference).pvalue


def log_trial(client, experiment_id: str, parent_id: str, name: str, tags: dict[str, str], final: float | None) -> None:
    """One nested trial run with three epochs of every plotted metric (FAILED when final is None)."""
    from mlflow.entities import Metric, Param

    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={"mlflow.parentRunId": parent_id, "bnew.role": "trial", "bnew.dataset": "cifar100", **tags},
    )
    epochs = range(3) if final is not None else range(1)
    metrics = [
        Metric(key, value, 0, epoch)
        for epoch in epochs
        for key, value in {
            "test_acc_binary": (final or 10.0) - 2 + epoch,
            "dist_to_binary": 0.5 / (epoch + 1),
            "lambda": 1e-4 * (epoch + 1),
            "flip_fraction": 0.01 / (epoch + 1),
        }.items()
    ]
    if final is not None:
        metrics.append(Metric("final_test_acc_binary", final, 0, 2))
    params = [Param("lr", "0.01"), Param("optimiser.lambda_rate", "0.01")]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, "FINISHED" if final is not None else "FAILED")


def create_sweep(client, root: Path, name: str, spec: dict | None) -> tuple[str, str]:
    """Experiment and parent run of a sweep (with its spec.yaml when given): their ids."""
    experiment_id = client.create_experiment(name, artifact_location=(root / name).as_uri())
    parent = client.create_run(experiment_id, run_name=name, tags={"bnew.role": "sweep", "bnew.sweep": name})
    if spec is not None:
        client.log_text(parent.info.run_id, yaml.safe_dump(spec), "spec.yaml")
    return experiment_id, parent.info.run_id


def log_table1_trials(client, experiment_id: str, parent_id: str) -> None:
    """FINAL_ACC's 9 quantise runs, one failed run, REAL_ACC's real runs and a teacher run."""
    common = {"bnew.grid": "table1", "bnew.ablation": "baseline"}
    for (optimiser, column), finals in FINAL_ACC.items():
        budget, distillation = COLUMNS[column]
        for seed, final in zip(SEEDS, finals):
            tags = {
                **common, "bnew.stage": "quantise", "bnew.optimiser": optimiser, "bnew.seed": str(seed),
                "bnew.budget": budget, "bnew.distillation": distillation,
                "bnew.stage_key": f"q-{optimiser}-{budget}-{seed}",
            }
            log_trial(client, experiment_id, parent_id, f"table1/{optimiser}/{column}/seed{seed}", tags, final)
    failed_tags = {
        **common, "bnew.stage": "quantise", "bnew.optimiser": "bnew", "bnew.seed": "0", "bnew.budget": "1000",
        "bnew.distillation": "yes", "bnew.stage_key": "q-bnew-1000-0", "bnew.error": "RuntimeError: CUDA out of memory",
    }
    log_trial(client, experiment_id, parent_id, "table1/bnew/1000/yes/seed0", failed_tags, None)
    for seed, final in enumerate(REAL_ACC):
        tags = {**common, "bnew.stage": "real", "bnew.optimiser": "real", "bnew.seed": str(seed), "bnew.budget": "200",
                "bnew.distillation": "no", "bnew.stage_key": f"real-{seed}"}
        log_trial(client, experiment_id, parent_id, f"table1/real/seed{seed}", tags, final)
    teacher_tags = {**common, "bnew.stage": "teacher", "bnew.optimiser": "teacher", "bnew.seed": "0"}
    log_trial(client, experiment_id, parent_id, "teacher/seed0", teacher_tags, 70.0)
    client.set_terminated(parent_id)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """A sqlite MLflow store with three sweeps: SWEEP (Table-1 layout, a missing cell, a failed
    trial, real runs, a teacher run that stays out of the tables), the same runs under a spec
    with a report section only (no plan), and TABLE2 (ablation x optimiser, with an excluded cell)."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    log_table1_trials(client, *create_sweep(client, root, SWEEP, SPEC))
    log_table1_trials(client, *create_sweep(client, root, UNPLANNED_SWEEP, {"report": SPEC["report"]}))
    experiment_id, parent_id = create_sweep(client, root, TABLE2, TABLE2_SPEC)
    for (ablation, optimiser), finals in TABLE2_ACC.items():
        for seed, final in enumerate(finals):
            tags = {
                "bnew.grid": "table2", "bnew.stage": "quantise", "bnew.optimiser": optimiser, "bnew.ablation": ablation,
                "bnew.seed": str(seed), "bnew.budget": "200", "bnew.distillation": "yes",
            }
            log_trial(client, experiment_id, parent_id, f"table2/{optimiser}/{ablation}/seed{seed}", tags, final)
    client.set_terminated(parent_id)
    return uri


def test_cells_match_hand_computed_statistics(tracking_uri: str) -> None:
    (table,) = build_tables(load_sweep(tracking_uri, SWEEP))
    assert table.row_labels == ["ste", "bnew", "real_valued"]
    assert table.column_labels == ["200/yes", "1000/yes"]  # paper order
    for (optimiser, column), finals in FINAL_ACC.items():
        cell = table.cells.loc[(optimiser, column)]
        assert cell.n == 3 and cell.status == "ok"
        assert cell["mean"] == pytest.approx(np.mean(finals))
        assert cell["std"] == pytest.approx(np.std(finals, ddof=1))
    expected_p = paired(FINAL_ACC[("bnew", "200/yes")], FINAL_ACC[("ste", "200/yes")])
    bnew = table.cells.loc[("bnew", "200/yes")]
    assert bnew.p_value == pytest.approx(expected_p) and bnew.test == "paired"
    # the family: bnew and real_valued against ste at 200/yes, real_valued at 1000/yes (bnew's is missing)
    real = [paired(REAL_ACC, FINAL_ACC[("ste", column)][:2]) for column in ("200/yes", "1000/yes")]
    holm = multipletests([expected_p, *real], method="holm")[1]
    assert bnew.p_adjusted == pytest.approx(holm[0]) and bnew.significant == (holm[0] < 0.05)
    real_cell = table.cells.loc[("real_valued", "1000/yes")]
    assert real_cell.p_adjusted == pytest.approx(holm[2])
    assert real_cell.test_reason == "paired by seed, 2 seeds in every cell (1 value without a partner left out)"
    assert math.isnan(table.cells.loc[("ste", "200/yes")].p_value)  # the reference itself
    assert (bnew.paper_mean, bnew.paper_std) == (55.8, 0.5)


def test_missing_cell_real_row_and_teacher_exclusion(tracking_uri: str) -> None:
    (table,) = build_tables(load_sweep(tracking_uri, SWEEP))
    missing = table.cells.loc[("bnew", "1000/yes")]
    assert (missing.n, missing.status) == (0, "missing") and math.isnan(missing["mean"])
    for column in table.column_labels:  # the real-valued runs fill every column
        real = table.cells.loc[("real_valued", column)]
        assert real.n == 2 and real["mean"] == pytest.approx(np.mean(REAL_ACC))
    assert table.cells.n.sum() == 9 + 2 * 2  # the teacher run and the failed run stay out


def test_without_plan_the_cross_of_trial_labels_is_expected(tracking_uri: str) -> None:
    (unplanned,) = build_tables(load_sweep(tracking_uri, UNPLANNED_SWEEP))
    (planned,) = build_tables(load_sweep(tracking_uri, SWEEP))
    assert unplanned.cells.loc[("bnew", "1000/yes")].status == "missing"
    pd.testing.assert_frame_equal(unplanned.cells, planned.cells)


def test_ablation_table_excluded_cell_and_paper_values(tracking_uri: str) -> None:
    (table,) = build_tables(load_sweep(tracking_uri, TABLE2))
    assert table.row_labels == ["baseline", "regulariser_l1"] and table.column_labels == ["ste", "bnew"]
    assert table.cells.loc[("regulariser_l1", "ste")].status == "n/a"  # excluded by the spec
    cell = table.cells.loc[("regulariser_l1", "bnew")]
    expected_p = paired(TABLE2_ACC[("regulariser_l1", "bnew")], TABLE2_ACC[("baseline", "bnew")])
    assert cell.p_value == pytest.approx(expected_p) and (cell.paper_mean, cell.paper_std) == (54.5, 0.5)
    (by_optimiser,) = build_tables(load_sweep(tracking_uri, TABLE2), compare_to="ste")
    expected_p = paired(TABLE2_ACC[("baseline", "bnew")], TABLE2_ACC[("baseline", "ste")])
    assert by_optimiser.cells.loc[("baseline", "bnew")].p_value == pytest.approx(expected_p)  # same row, column ste


def test_compare_to_and_unknown_reference(tracking_uri: str) -> None:
    sweep = load_sweep(tracking_uri, SWEEP)
    (table,) = build_tables(sweep, compare_to="bnew")
    expected_p = paired(FINAL_ACC[("ste", "200/yes")], FINAL_ACC[("bnew", "200/yes")])
    assert table.cells.loc[("ste", "200/yes")].p_value == pytest.approx(expected_p)
    assert math.isnan(table.cells.loc[("ste", "1000/yes")].p_value)  # its reference cell is missing
    with pytest.raises(ReportError, match="bop"):
        build_tables(sweep, compare_to="bop")
    with pytest.raises(BnewError, match="no MLflow experiment"):
        load_sweep(tracking_uri, "no-such-sweep")


@pytest.mark.parametrize("fmt", ["md", "csv", "latex"])
def test_write_report_files_and_artifacts(tracking_uri: str, tmp_path: Path, fmt: str) -> None:
    from mlflow import MlflowClient

    report = write_report(tracking_uri, SWEEP, tmp_path, fmt=fmt)
    text = (tmp_path / f"report.{ {'md': 'md', 'csv': 'csv', 'latex': 'tex'}[fmt] }").read_text()
    assert text == report.text
    ste_mean, ste_std = np.mean(FINAL_ACC[("ste", "200/yes")]), np.std(FINAL_ACC[("ste", "200/yes")], ddof=1)
    if fmt == "md":
        assert f"{ste_mean:.2f} ± {ste_std:.2f} (n=3) (ref)" in text
        assert "— missing" in text and "55.8 ± 0.5" in text
        assert "table1/bnew/1000/yes/seed0" in text and "CUDA out of memory" in text
    elif fmt == "latex":
        assert r"\toprule" in text and r"\bottomrule" in text and r"real\_valued" in text
        assert f"{ste_mean:.2f} $\\pm$ {ste_std:.2f}" in text
    else:
        header = "grid,dataset,row,column,n,mean,std,p_value,p_adjusted"
        assert "missing" in text and text.splitlines()[0].startswith(header)
        cells = pd.read_csv(tmp_path / "report.csv").set_index(["row", "column"])
        assert cells.loc[("ste", "200/yes"), "seed_values"] == " ".join(
            f"{seed}:{value!r}" for seed, value in zip(SEEDS, FINAL_ACC[("ste", "200/yes")]))
        assert cells.loc[("bnew", "200/yes"), "test"] == "paired"
    assert list(report.failed.run_name) == ["table1/bnew/1000/yes/seed0"]
    pngs = [path for path in report.files if path.suffix == ".png"]
    assert {path.name for path in pngs} == {
        f"table1_cifar100_{name}.png" for name in ("accuracy", "dist_lambda", "flips", "bars")
    }
    for path in pngs:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.width >= 300 and image.height >= 200
    client = MlflowClient(tracking_uri)
    parent_id = load_sweep(tracking_uri, SWEEP).parent_run_id
    logged = {Path(info.path).name for info in client.list_artifacts(parent_id, "report")}
    assert {path.name for path in report.files} <= logged


def registered_callbacks(app) -> list:
    """Callbacks of every command of a typer app and of its sub-apps."""
    nested = [callback for group in app.registered_groups for callback in registered_callbacks(group.typer_instance)]
    return [command.callback for command in app.registered_commands] + nested


def test_cli_report_command(tracking_uri: str, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from sweeps.cli import app
    from sweeps.cli.sweep import report_command

    assert report_command in registered_callbacks(app)
    report_app = typer.Typer()
    report_app.command()(report_command)
    result = CliRunner().invoke(
        report_app, [SWEEP, "--tracking-uri", tracking_uri, "--out", str(tmp_path), "--compare-to", "ste", "--no-log"]
    )
    assert result.exit_code == 0, result.output
    assert "table1 / cifar100" in result.output and "— missing" in result.output
    assert (tmp_path / "report.md").exists() and (tmp_path / "table1_cifar100_bars.png").exists()
    failures = [(["no-such-sweep"], "no MLflow experiment"), ([SWEEP, "--format", "html"], "unknown format")]
    for arguments, message in failures:
        bad = CliRunner().invoke(report_app, [*arguments, "--tracking-uri", tracking_uri, "--out", str(tmp_path)])
        assert bad.exit_code == 2 and message in bad.output


def test_default_tracking_uri_is_the_sweep_services(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sweeps.analysis.report import default_tracking_uri

    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    assert default_tracking_uri("my-sweep") == f"sqlite:///{tmp_path.resolve() / '.bnew' / 'mlflow.db'}"
