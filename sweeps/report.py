"""Sweep reports: tables, significance tests and plots from the runs a sweep logged to MLflow.

`write_report(tracking_uri, sweep)` reads the sweep's experiment (parent run tagged
`bnew.role=sweep` with its `spec.yaml`, trial runs tagged `bnew.role=trial`), builds one
table per grid and dataset (rows and columns named by the spec's `report:` section), puts
mean ± sample standard deviation over seeds, the seed count, Welch's t-test against a
reference row (or column) and the paper's value in each cell, marks the cells the spec plans
but no finished run fills as missing, lists failed trials, draws per-epoch curves and a bar
chart, writes everything to a folder and logs it to the parent run under `report/`.
Needs MLflow, pandas, scipy and matplotlib; not Ray.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import typer
import yaml
from pydantic import ValidationError
from scipy import stats

from bnew_core.config import BnewError, format_validation_error
from sweeps.claims import ClaimResult, claims_frame, evaluate_claims, plot_claims, render_claims_markdown
from sweeps.plan import grid_points
from sweeps.spec import ABLATIONS, PAPER_TABLES_PATH, ReportSpec, SweepSpec, load_spec, parse_spec, preset_names

FORMAT_SUFFIX: dict[str, str] = {"md": "md", "csv": "csv", "latex": "tex"}
"""Report formats and the suffix of their file."""

RESULT_STAGES = ("quantise", "real")
"""Only these stages enter result tables; teacher and pretrain runs are prerequisites."""
REAL = "real"
"""Stage and optimiser name of the real-valued network's runs."""
REAL_ROW = "real_valued"
"""Row label of the real-valued network (the key tables.json uses for Table 2)."""
PAPER_DATASET = "cifar100"
"""Every table of the paper is CIFAR-100: paper values are shown beside CIFAR-100 tables only."""
CLAIMS_PLOT = "claims.png"
"""The figure to look at first: every claim's effect with its 95% CI beside the paper's."""
SIGNIFICANCE_LEVEL = 0.05
NO_COLUMN = "all"
"""Column label of a table whose layout has no column axes."""
TRIAL_TAGS = ("grid", "stage", "stage_key", "dataset", "optimiser", "ablation", "seed", "budget", "distillation")
"""`bnew.<name>` tags every trial frame has as columns (named without the prefix); any other
`bnew.*` tag, such as `bnew.param.lr` of a params axis, becomes a column too."""


class ReportError(BnewError):
    """A user-facing error: unknown sweep, unknown reference, unreadable report section."""


def read_layout(spec: dict[str, Any]) -> ReportSpec:
    """The spec's `report:` section (rows, columns, paper_table, baseline, metric); defaults without one."""
    try:
        return ReportSpec.model_validate(spec.get("report") or {})
    except ValidationError as exc:
        raise ReportError(format_validation_error(exc, "spec.yaml report")) from None


def load_paper_tables() -> dict[str, Any]:
    """The paper's tables (package data copied from shared/paper/tables.json)."""
    return json.loads(PAPER_TABLES_PATH.read_text())


# --------------------------------------------------------------------------- loading


@dataclass
class SweepRuns:
    """Everything MLflow holds about one sweep."""

    tracking_uri: str | None
    name: str
    parent_run_id: str | None
    spec: dict[str, Any]
    trials: pd.DataFrame
    """One row per trial run, any status: run_id, run_name, status, start_time, metrics
    (latest value per key), error and every other `bnew.*` tag (at least TRIAL_TAGS)."""


def mlflow_client(tracking_uri: str | None):
    """An MlflowClient for the URI (None: MLflow's default resolution)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def search_all_runs(client, experiment_id: str, filter_string: str = "") -> list:
    """Every run of the experiment (that matches `filter_string`), following MLflow's page tokens."""
    runs, page_token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=1000, page_token=page_token)
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def read_spec(client, run_id: str) -> dict[str, Any]:
    """The parent run's `spec.yaml` artifact, or {} when it has none."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "spec.yaml", tmp)
        except (MlflowException, OSError):  # the artifact store's error for a missing file
            return {}
        return yaml.safe_load(Path(path).read_text()) or {}


def load_sweep(tracking_uri: str | None, sweep: str) -> SweepRuns:
    """Read the sweep's experiment: the parent run, its spec and every trial run."""
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        raise ReportError(f"no MLflow experiment named {sweep!r} at {tracking_uri or 'the default tracking URI'}")
    runs = search_all_runs(client, experiment.experiment_id)
    parents = sorted(
        (run for run in runs if run.data.tags.get("bnew.role") == "sweep"), key=lambda run: run.info.start_time or 0
    )
    parent_run_id = parents[-1].info.run_id if parents else None
    spec = read_spec(client, parent_run_id) if parent_run_id else {}
    return SweepRuns(tracking_uri, sweep, parent_run_id, spec, trial_frame(runs))


def trial_frame(runs: list) -> pd.DataFrame:
    """`SweepRuns.trials` of the experiment's runs: one row per trial run."""
    records = [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time or 0,
            "metrics": dict(run.data.metrics),
            **{tag.removeprefix("bnew."): value for tag, value in run.data.tags.items() if tag.startswith("bnew.")},
        }
        for run in runs
        if run.data.tags.get("bnew.role") == "trial"
    ]
    columns = dict.fromkeys(["run_id", "run_name", "status", "start_time", "metrics", "error", *TRIAL_TAGS])
    columns.update(dict.fromkeys(key for record in records for key in record))
    trials = pd.DataFrame(records, columns=list(columns))
    tag_columns = [column for column in columns if column not in ("start_time", "metrics")]
    trials[tag_columns] = trials[tag_columns].astype(object).fillna("")
    return trials


def tuning_searches(sweep: SweepRuns) -> str:
    """The Markdown of the sweep's searches (`sweeps.tuning`), if it tuned; its tables then keep,
    per tuned cell, only the runs of the best params."""
    from sweeps import tuning
    from sweeps.spec import parse_spec

    if not sweep.spec.get("search"):
        return ""
    spec = parse_spec(sweep.spec, f"{sweep.name}/spec.yaml")
    summaries = tuning.summarise(sweep.trials, spec)
    sweep.trials = tuning.best_runs_only(sweep.trials, spec)
    return tuning.render_markdown(summaries, spec.search.metric) if summaries else ""


def failed_trials(sweep: SweepRuns) -> pd.DataFrame:
    """FAILED trials that no later finished run of the same stage key replaced, with their error."""
    trials = sweep.trials
    finished_keys = set(trials.loc[trials.status == "FINISHED", "stage_key"]) - {""}
    failed = trials[(trials.status == "FAILED") & ~trials.stage_key.isin(finished_keys)]
    # log_tail: the last lines of the trial's log (sweeps.trial_log), where it recorded them
    failed = failed.assign(log_tail=failed["log_tail"] if "log_tail" in failed else "")
    return failed[["run_name", "grid", "stage", "optimiser", "ablation", "seed", "error", "log_tail"]].reset_index(drop=True)


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """One grid of one dataset: a cell per (row, column) label, and the runs behind them."""

    grid: str
    dataset: str
    layout: ReportSpec
    reference: str | None
    """Row or column label the t-tests compare against (None: no tests)."""
    row_labels: list[str]
    column_labels: list[str]
    cells: pd.DataFrame
    """Indexed by (row, column): n, mean, std, p_value, significant, paper_mean, paper_std, status
    (`ok`; `missing`: planned, no finished run; `n/a`: not planned, no run)."""
    runs: pd.DataFrame
    """Finished runs behind the cells: run_id, row, column, seed, value."""
    without_validation: int = 0
    """Result runs that `select: best_val` found no validation history in (they report their final epoch)."""

    @property
    def title(self) -> str:
        return f"{self.grid} / {self.dataset}: {self.layout.metric}"

    @property
    def slug(self) -> str:
        """File-name prefix of this table's outputs."""
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{self.grid}_{self.dataset}")


def natural_key(value: str) -> tuple[float, str]:
    """Sort numbers by value (`200` before `1000`), then text."""
    try:
        return (float(value), "")
    except ValueError:
        return (math.inf, value)


def ordered(labels: set[str] | list[str], preferred: list[str]) -> list[str]:
    """Labels in the preferred order (the paper's), the rest in natural order after them."""
    known = [label for label in preferred if label in labels]
    return known + sorted(set(labels) - set(known), key=natural_key)


def label_of(frame: pd.DataFrame, axes: list[str]) -> pd.Series:
    """`/`-joined tag values of the axes per trial (NO_COLUMN when there are no axes); a params
    axis such as `lr` reads the tag `bnew.param.lr`."""
    if not axes:
        return pd.Series(NO_COLUMN, index=frame.index, dtype=object)
    columns = frame.reindex(columns=[axis if axis in TRIAL_TAGS else f"param.{axis}" for axis in axes], fill_value="")
    labels = ["/".join(map(str, values)) for values in columns.itertuples(index=False)]
    return pd.Series(labels, index=frame.index, dtype=object)


def planned_points(spec: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """The grid label and the grid points the spec plans; None without a spec this version reads."""
    if not spec:
        return None
    try:
        parsed = parse_spec(spec, "spec.yaml")
        return parsed.grid_label, grid_points(parsed)
    except (BnewError, ImportError):  # a spec of another version, or a search space without Ray
        return None


def point_label(point: dict[str, Any], axes: list[str]) -> str:
    """Label of a grid point as its trials' tags spell it (distillation `yes`/`no`, after the ablation)."""
    def tag(axis: str) -> str:
        if axis == "distillation":
            distillation = ABLATIONS.get(point["ablation"], {}).get("distillation", point["distillation"])
            return "yes" if distillation else "no"
        return str(point.get(axis, ""))

    return "/".join(tag(axis) for axis in axes) if axes else NO_COLUMN


Cell = tuple[str, Optional[str]]
"""(row, column) label; column None: every column (the real-valued row)."""


def expected_cells(trials: pd.DataFrame, points: list[dict[str, Any]], layout: ReportSpec) -> set[Cell]:
    """(row, column) of every planned grid point; without a plan, the cross of the row and column
    labels the trials carry. The real-valued row is (REAL_ROW, None): it spans every column."""
    if points:
        return {
            (REAL_ROW, None)
            if point["optimiser"] == REAL
            else (point_label(point, layout.rows), point_label(point, layout.columns))
            for point in points
        }
    quantised = trials[trials.stage != REAL]
    cells = set(itertools.product(label_of(quantised, layout.rows), label_of(quantised, layout.columns)))
    return cells | ({(REAL_ROW, None)} if (trials.stage == REAL).any() else set())


def final_metric(metrics: dict[str, float], metric: str) -> float:
    """`final_<metric>` when logged, else the last logged value of the metric, else NaN."""
    return metrics.get(f"final_{metric}", metrics.get(metric, math.nan))


VALIDATION_METRIC = "val_acc_binary"
"""What `select: best_val` picks the epoch by: the binary network's validation accuracy."""
SELECTION_NOTES = {
    "final": "the final epoch of each run",
    "best_val": f"each run's epoch of best {VALIDATION_METRIC} (first of ties)",
}


def best_val_metric(client, run_id: str, metric: str) -> float | None:
    """`metric` at the run's epoch of best validation accuracy; None without a validation history."""
    validation = {point.step: point.value for point in client.get_metric_history(run_id, VALIDATION_METRIC)}
    if not validation:
        return None
    best_epoch = min(validation, key=lambda step: (-validation[step], step))
    values = {point.step: point.value for point in client.get_metric_history(run_id, metric)}
    return values.get(best_epoch, math.nan)


def selected_values(sweep: SweepRuns, trials: pd.DataFrame, layout: ReportSpec) -> tuple[pd.Series, int]:
    """The reported value of each trial under `layout.select`, and how many best_val trials had no
    validation split (those report their final epoch)."""
    finals = pd.Series([final_metric(metrics, layout.metric) for metrics in trials.metrics], index=trials.index)
    if layout.select == "final":
        return finals, 0
    client = mlflow_client(sweep.tracking_uri)
    chosen = {index: best_val_metric(client, run_id, layout.metric) for index, run_id in trials.run_id.items()}
    without = [index for index, value in chosen.items() if value is None]
    return pd.Series({index: finals[index] if value is None else value for index, value in chosen.items()},
                     index=trials.index, dtype=float), len(without)


def welch_p_value(sample: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided Welch t-test p-value; NaN unless both samples have two or more values."""
    if len(sample) < 2 or len(reference) < 2:
        return math.nan
    return float(stats.ttest_ind(sample, reference, equal_var=False).pvalue)


def build_table(
    trials: pd.DataFrame, grid: str, dataset: str, layout: ReportSpec, points: list[dict[str, Any]],
    compare_to: str | None, paper: dict[str, Any],
) -> Table:
    """The table of one grid and dataset from its result trials (any status, each with its
    reported `value`) and planned points."""
    paper_table = paper.get(layout.paper_table or "", {}) if dataset == PAPER_DATASET else {}
    paper_rows: dict[str, dict[str, Any]] = paper_table.get("rows", {})
    quantised = trials[trials.stage != REAL]
    expected = expected_cells(trials, points, layout)
    row_labels = ordered(
        {row for row, _ in expected if row != REAL_ROW} | set(label_of(quantised, layout.rows)), list(paper_rows)
    )
    column_labels = ordered(
        {column for _, column in expected if column is not None} | set(label_of(quantised, layout.columns)),
        list(next(iter(paper_rows.values()), {})),
    )
    if (REAL_ROW, None) in expected:
        row_labels.append(REAL_ROW)

    # The real-valued network does not depend on the column axes: its runs fill every column.
    finished = trials[trials.status == "FINISHED"].assign(
        row=lambda frame: label_of(frame, layout.rows).where(frame.stage != REAL, REAL_ROW),
        column=lambda frame: [
            column_labels if stage == REAL else [label]
            for stage, label in zip(frame.stage, label_of(frame, layout.columns))
        ],
        )
    runs = (
        finished.explode("column")
        .dropna(subset=["value"])
        .sort_values("start_time")
        .drop_duplicates(["row", "column", "seed"], keep="last")  # a re-run replaces its predecessor
        [["run_id", "row", "column", "seed", "value"]]
        .reset_index(drop=True)
    )

    reference = compare_to or layout.baseline
    if reference not in row_labels and reference not in column_labels:
        reference = None
    samples = {key: group.value.to_numpy() for key, group in runs.groupby(["row", "column"])}
    empty = np.array([])
    records = []
    for row, column in itertools.product(row_labels, column_labels):
        sample = samples.get((row, column), empty)
        reference_key = (reference, column) if reference in row_labels else (row, reference)
        paper_value = paper_table.get("real_valued") if row == REAL_ROW else paper_rows.get(row, {}).get(column)
        p_value = math.nan if reference is None or reference_key == (row, column) else welch_p_value(
            sample, samples.get(reference_key, empty)
        )
        planned = (row, None if row == REAL_ROW else column) in expected
        records.append(
            {
                "row": row,
                "column": column,
                "n": len(sample),
                "mean": float(np.mean(sample)) if len(sample) else math.nan,
                "std": float(np.std(sample, ddof=1)) if len(sample) > 1 else math.nan,
                "p_value": p_value,
                "significant": bool(p_value < SIGNIFICANCE_LEVEL),
                "paper_mean": paper_value[0] if paper_value else math.nan,
                "paper_std": paper_value[1] if paper_value else math.nan,
                "status": "ok" if len(sample) else ("missing" if planned else "n/a"),
            }
        )
    cells = pd.DataFrame(records).set_index(["row", "column"])
    return Table(grid, dataset, layout, reference, row_labels, column_labels, cells, runs)


def report_layout(sweep: SweepRuns, select: str | None = None) -> ReportSpec:
    """The spec's layout, with `select` (from the command line) instead of the spec's when given."""
    layout = read_layout(sweep.spec)
    return layout if select is None else layout.model_copy(update={"select": select})


def result_trials(sweep: SweepRuns, layout: ReportSpec) -> tuple[pd.DataFrame, int]:
    """The result trials (stages quantise and real) with their reported `value`, and how many of
    them lacked the validation split `select: best_val` needs."""
    results = sweep.trials[sweep.trials.stage.isin(RESULT_STAGES)]
    values, without_validation = selected_values(sweep, results, layout)
    return results.assign(value=values), without_validation


def build_tables(
    sweep: SweepRuns, compare_to: str | None = None, layout: ReportSpec | None = None,
    results: tuple[pd.DataFrame, int] | None = None,
) -> list[Table]:
    """One table per grid and dataset: the planned ones and those the sweep's result trials
    (stages quantise and real) carry. With a readable spec every trial belongs to its grid."""
    layout = layout or report_layout(sweep)
    plan = planned_points(sweep.spec)
    results, without_validation = results or result_trials(sweep, layout)
    if plan:
        results = results.assign(grid=plan[0])
    keys = set(zip(results.grid, results.dataset))
    if plan:
        keys |= {(plan[0], point["dataset"]) for point in plan[1]}
    paper = load_paper_tables()
    tables = []
    for grid, dataset in sorted(keys):
        points = [point for point in plan[1] if point["dataset"] == dataset] if plan else []
        trials = results[(results.grid == grid) & (results.dataset == dataset)]
        table = build_table(trials, grid or "all", dataset, layout, points, compare_to, paper)
        table.without_validation = without_validation
        tables.append(table)
    if compare_to and not any(table.reference == compare_to for table in tables):
        raise ReportError(f"--compare-to {compare_to!r} is no row or column label of any table")
    return tables


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class TextStyle:
    """Symbols of one text format."""

    plus_minus: str
    missing: str
    significant: str
    escape: Callable[[str], str] = str


def latex_escape(text: str) -> str:
    """Backslash the characters LaTeX treats specially in labels and notes."""
    return re.sub(r"([_%&#$])", r"\\\1", text)


MARKDOWN = TextStyle(plus_minus="±", missing="— missing", significant="*")
LATEX = TextStyle(plus_minus=r"$\pm$", missing="---", significant=r"$^{\ast}$", escape=latex_escape)


def cell_text(cell: pd.Series, is_reference: bool, style: TextStyle) -> str:
    """`55.12 ± 0.40 (n=5) p=0.012*`; `— missing` without runs; `n/a` where the paper has none."""
    if cell.status != "ok":
        return style.missing if cell.status == "missing" else "n/a"
    spread = f" {style.plus_minus} {cell['std']:.2f}" if cell.n > 1 else ""
    text = f"{cell['mean']:.2f}{spread} (n={cell.n})"
    if is_reference:
        return text + " (ref)"
    if not math.isnan(cell.p_value):
        text += f" p={cell.p_value:.3g}" + (style.significant if cell.significant else "")
    return text


def paper_text(cell: pd.Series, style: TextStyle) -> str:
    """The paper's `mean ± std`, empty where the paper has no value for the cell."""
    return "" if math.isnan(cell.paper_mean) else f"{cell.paper_mean:.1f} {style.plus_minus} {cell.paper_std:.1f}"


def has_paper_values(table: Table) -> bool:
    return bool(table.cells.paper_mean.notna().any())


def wide_rows(table: Table, style: TextStyle) -> tuple[list[str], list[list[str]]]:
    """Header and body of the table as text: a column per label, each followed by the paper's."""
    with_paper = has_paper_values(table)
    header = [style.escape("/".join(table.layout.rows))]
    for column in table.column_labels:
        header += [style.escape(column)] + (["paper"] if with_paper else [])
    body = []
    for row in table.row_labels:
        line = [style.escape(row)]
        for column in table.column_labels:
            cell = table.cells.loc[(row, column)]
            line.append(cell_text(cell, table.reference in (row, column), style))
            if with_paper:
                line.append(paper_text(cell, style))
        body.append(line)
    return header, body


def selection_note(layout: ReportSpec, without_validation: int = 0) -> str:
    """Which epoch's value each run reports, as printed under every table."""
    note = f"Selection (report.select: {layout.select}): `{layout.metric}` at {SELECTION_NOTES[layout.select]}."
    if without_validation:
        note += (f" {without_validation} run(s) have no validation split (data.val_size = 0): "
                 "best_val needs one, so they report their final epoch.")
    return note


def table_note(table: Table) -> str:
    """What the cells and p-values mean, and which epoch they report."""
    note = "Mean ± sample std over n seeds; missing: planned, no finished run; n/a: not planned."
    if table.reference is None:
        note += " No reference row or column: no significance tests."
    else:
        where = "column" if table.reference in table.row_labels else "row"
        note += f" p: Welch's t-test against `{table.reference}` in the same {where}; * p < {SIGNIFICANCE_LEVEL}."
    return note + " " + selection_note(table.layout, table.without_validation)


def render_markdown(table: Table) -> str:
    """A Markdown section: title, table, note on the tests."""
    header, body = wide_rows(table, MARKDOWN)
    lines = [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines + ["", table_note(table), ""])


def render_latex(table: Table) -> str:
    """A booktabs tabular of the table."""
    header, body = wide_rows(table, LATEX)
    lines = [
        f"% {LATEX.escape(table.title)}. {LATEX.escape(table_note(table))}",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
        *(" & ".join(line) + r" \\" for line in body),
        r"\bottomrule",
        r"\end{tabular}",
        "",
    ]
    return "\n".join(lines)


CSV_COLUMNS = [
    "grid", "dataset", "row", "column", "n", "mean", "std", "p_value", "significant", "reference",
    "paper_mean", "paper_std", "status",
]


def cells_frame(tables: list[Table]) -> pd.DataFrame:
    """Every cell of every table in long form (the CSV format)."""
    frames = [
        table.cells.reset_index().assign(grid=table.grid, dataset=table.dataset, reference=table.reference)
        for table in tables
    ]
    return pd.concat(frames, ignore_index=True)[CSV_COLUMNS] if frames else pd.DataFrame(columns=CSV_COLUMNS)


def render_failed_markdown(failed: pd.DataFrame) -> str:
    """The failed trials as a Markdown list."""
    if failed.empty:
        return "No failed trials.\n"
    items = [
        f"- `{trial.run_name}` ({trial.stage}): {trial.error or 'no error recorded'}"
        + (f"\n\n  ```\n{textwrap.indent(trial.log_tail, '  ')}\n  ```\n" if trial.log_tail else "")
        for trial in failed.itertuples()
    ]
    return "\n".join([f"## Failed trials ({len(failed)})", "", *items, ""])


# --------------------------------------------------------------------------- plots


def load_histories(sweep: SweepRuns, table: Table, metrics: list[str]) -> pd.DataFrame:
    """Per-epoch values of the table's runs: row, column, run_id, metric, step, value."""
    client = mlflow_client(sweep.tracking_uri)
    run_ids = table.runs.run_id.unique()
    histories = {
        (run_id, metric): [(point.step, point.value) for point in client.get_metric_history(run_id, metric)]
        for run_id in run_ids
        for metric in metrics
    }
    records = [
        {"row": run.row, "column": run.column, "run_id": run.run_id, "metric": metric, "step": step, "value": value}
        for run in table.runs.itertuples()
        for metric in metrics
        for step, value in histories[(run.run_id, metric)]
    ]
    return pd.DataFrame(records, columns=["row", "column", "run_id", "metric", "step", "value"])


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def row_colours(table: Table) -> dict[str, Any]:
    """One colour per row label, the same in every panel and figure."""
    palette = pyplot().get_cmap("tab10" if len(table.row_labels) <= 10 else "tab20")
    return {row: palette(index % palette.N) for index, row in enumerate(table.row_labels)}


def plot_histories(histories: pd.DataFrame, table: Table, metrics: list[str], path: Path) -> Path:
    """A panel per (metric, column): mean over seeds per epoch, one line per row, ±std band."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    colours = row_colours(table)
    figure, axes = plt.subplots(
        len(metrics), len(table.column_labels), figsize=(4.5 * len(table.column_labels), 3.2 * len(metrics)),
        squeeze=False, sharex="col",
    )
    summary = histories.groupby(["metric", "column", "row", "step"]).value.agg(["mean", "std"]).reset_index()
    for (metric_index, metric), (column_index, column) in itertools.product(
        enumerate(metrics), enumerate(table.column_labels)
    ):
        ax = axes[metric_index][column_index]
        panel = summary[(summary.metric == metric) & (summary.column == column)]
        for row in table.row_labels:
            line = panel[panel.row == row]
            if line.empty:
                continue
            ax.plot(line.step, line["mean"], label=row, color=colours[row])
            spread = line["std"].fillna(0)
            ax.fill_between(line.step, line["mean"] - spread, line["mean"] + spread, color=colours[row], alpha=0.2)
        ax.set_title(f"{metric} ({column})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    plotted = set(histories.row)
    legend = [Line2D([], [], color=colours[row], label=row) for row in table.row_labels if row in plotted]
    figure.legend(handles=legend, loc="center right", fontsize=8)
    figure.suptitle(f"{table.grid} / {table.dataset}: mean ± std over seeds", fontsize=10)
    figure.tight_layout(rect=(0, 0, 0.85, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_bars(table: Table, path: Path) -> Path:
    """Grouped bars of the table (a group per column, a bar per row) with ±std error bars and
    the paper's values as black markers."""
    plt = pyplot()
    colours = row_colours(table)
    figure, ax = plt.subplots(figsize=(max(5.0, 2.0 + 0.4 * len(table.column_labels) * len(table.row_labels)), 4))
    width = 0.8 / len(table.row_labels)
    positions = np.arange(len(table.column_labels))
    for index, row in enumerate(table.row_labels):
        cells = table.cells.loc[row].reindex(table.column_labels)
        x = positions + (index - (len(table.row_labels) - 1) / 2) * width
        ax.bar(x, cells["mean"], width, yerr=cells["std"].fillna(0), capsize=3, label=row, color=colours[row])
        ax.scatter(x, cells.paper_mean, color="black", marker="_", s=80, zorder=3)
    ax.set_xticks(positions, table.column_labels)
    ax.set_ylabel(table.layout.metric)
    lowest = (table.cells["mean"] - table.cells["std"].fillna(0)).min()
    if not math.isnan(lowest):
        ax.set_ylim(max(0.0, lowest - 5), None)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(table.title + (" (black: paper)" if has_paper_values(table) else ""), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_table(sweep: SweepRuns, table: Table, out_dir: Path) -> list[Path]:
    """The four figures of a table: accuracy, distance to binary and lambda, flips, bars."""
    metric = table.layout.metric
    figures = {"accuracy": [metric], "dist_lambda": ["dist_to_binary", "lambda"], "flips": ["flip_fraction"]}
    histories = load_histories(sweep, table, sorted({m for ms in figures.values() for m in ms}))
    paths = [
        plot_histories(histories[histories.metric.isin(ms)], table, ms, out_dir / f"{table.slug}_{name}.png")
        for name, ms in figures.items()
    ]
    return paths + [plot_bars(table, out_dir / f"{table.slug}_bars.png")]


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What `write_report` produced."""

    tables: list[Table]
    failed: pd.DataFrame
    text: str
    """The tables (and failed trials) in the chosen format, as written to `files[0]`."""
    files: list[Path]
    claims: list[ClaimResult]


def teacher_runs(sweep: SweepRuns) -> pd.DataFrame:
    """The sweep's finished teacher runs with their test accuracy (`final_test_acc_binary`: a
    teacher has no binary weights, so it is the teacher's own accuracy)."""
    trials = sweep.trials
    teachers = trials[(trials.stage == "teacher") & (trials.status == "FINISHED")]
    return pd.DataFrame({
        "run_name": teachers.run_name, "run_id": teachers.run_id, "dataset": teachers.dataset, "seed": teachers.seed,
        "test_acc": [final_metric(metrics, "test_acc_binary") for metrics in teachers.metrics],
    }).sort_values(["dataset", "seed", "run_name"]).reset_index(drop=True)


def render_teachers_markdown(teachers: pd.DataFrame) -> str:
    """The distillation teachers and their test accuracies, to trace distilled cells to them."""
    if teachers.empty:
        return ""
    items = [f"- `{t.run_name}` (run {t.run_id}): test accuracy {t.test_acc:.2f}%" for t in teachers.itertuples()]
    return "\n".join([f"## Distillation teachers ({len(teachers)})", "", *items, ""])


def claim_results(results: pd.DataFrame, layout: ReportSpec) -> list[ClaimResult]:
    """The spec's claims judged on the finished result runs: one value per trained stage (a
    re-run replaces its predecessor; roles sharing a stage, as capped budgets do, count once)."""
    if not layout.claims:
        return []
    finished = results[results.status == "FINISHED"]
    trained = finished.stage_key.where(finished.stage_key != "", finished.run_name)
    finished = finished.assign(trained=trained).sort_values("start_time").drop_duplicates("trained", keep="last")
    axes = sorted({axis for claim in layout.claims for axis in claim.axes()})
    columns = finished.reindex(columns=[axis if axis in TRIAL_TAGS else f"param.{axis}" for axis in axes], fill_value="")
    frame = pd.DataFrame(columns.to_numpy(), columns=axes, index=finished.index).assign(value=finished.value)
    return evaluate_claims(frame, layout.claims, load_paper_tables())


def render(
    tables: list[Table], failed: pd.DataFrame, fmt: str, sweep_name: str,
    claims: list[ClaimResult] = (), teachers: pd.DataFrame | None = None,
) -> str:
    """The tables in one format; Markdown also gives the claims' verdicts (first), the teachers
    and the failed trials."""
    if fmt == "csv":
        return cells_frame(tables).to_csv(index=False)
    if fmt == "latex":
        return "\n".join(render_latex(table) for table in tables)
    sections = [f"# Sweep report: {sweep_name}", ""]
    if claims:
        layout = tables[0].layout if tables else ReportSpec()
        note = f"`{layout.metric}` at {SELECTION_NOTES[layout.select]}, report.select: {layout.select}"
        sections += [render_claims_markdown(claims, note), f"![claims]({CLAIMS_PLOT})", ""]
    sections += [render_markdown(table) for table in tables]
    if teachers is not None:
        sections.append(render_teachers_markdown(teachers))
    return "\n".join(sections + [render_failed_markdown(failed)])


def write_report(
    tracking_uri: str | None,
    sweep_name: str,
    out_dir: Path | None = None,
    fmt: str = "md",
    compare_to: str | None = None,
    log_artifacts: bool = True,
    select: str | None = None,
) -> Report:
    """Build the sweep's claims, tables and plots, write them to `out_dir` (default
    `reports/<sweep>`) and log them to the parent run under `report/`. `select` overrides the
    spec's `report.select`."""
    if fmt not in FORMAT_SUFFIX:
        raise ReportError(f"unknown format {fmt!r}: expected one of {sorted(FORMAT_SUFFIX)}")
    sweep = load_sweep(tracking_uri, sweep_name)
    searches = tuning_searches(sweep)
    layout = report_layout(sweep, select)
    results = result_trials(sweep, layout)
    tables = build_tables(sweep, compare_to, layout, results)
    try:
        claims = claim_results(results[0], layout)
    except BnewError as exc:
        raise ReportError(str(exc)) from None
    failed = failed_trials(sweep)
    out_dir = Path(out_dir or Path("reports") / sweep_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = render(tables, failed, fmt, sweep_name, claims, teacher_runs(sweep))
    if searches and fmt == "md":
        text += "\n" + searches
    table_path = out_dir / f"report.{FORMAT_SUFFIX[fmt]}"
    table_path.write_text(text)
    files = [table_path]
    if claims:
        claims_path = out_dir / "claims.csv"
        claims_frame(claims).to_csv(claims_path, index=False)
        files += [claims_path, plot_claims(claims, out_dir / CLAIMS_PLOT, f"{sweep_name}: claims, {layout.metric}")]
    if not failed.empty:
        failed_path = out_dir / "failed_trials.csv"
        failed.to_csv(failed_path, index=False)
        files.append(failed_path)
    for table in tables:
        files += plot_table(sweep, table, out_dir)
    if log_artifacts and sweep.parent_run_id:
        client = mlflow_client(tracking_uri)
        for path in files:
            client.log_artifact(sweep.parent_run_id, str(path), artifact_path="report")
    return Report(tables, failed, text, files, claims)


# --------------------------------------------------------------------------- command line


def default_tracking_uri(sweep_name: str) -> str:
    """Where `bnew sweep run` tracked the sweep: its preset's tracking URI when the name is a
    preset's, else the sweep service's default store."""
    spec = load_spec(sweep_name) if sweep_name in preset_names() else SweepSpec(name=sweep_name)
    return spec.resolved_tracking_uri()


def report_command(
    name: str = typer.Argument(..., help="Sweep name (its MLflow experiment)."),
    fmt: str = typer.Option("md", "--format", help="md | csv | latex"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder. Default: reports/NAME."),
    tracking_uri: Optional[str] = typer.Option(
        None, envvar="MLFLOW_TRACKING_URI", help="MLflow tracking URI. Default: the preset's, else .bnew/mlflow.db."
    ),
    compare_to: Optional[str] = typer.Option(
        None, help="Row or column label to t-test every cell against (e.g. ste), instead of the spec's baseline."
    ),
    log: bool = typer.Option(True, "--log/--no-log", help="Also log the files to the parent run under report/."),
    select: Optional[str] = typer.Option(
        None, help="final | best_val: the epoch each run reports (default: the spec's report.select)."
    ),
) -> None:
    """Report a sweep from its MLflow runs: claims, tables, teachers, failed trials and plots.

    A verdict per claim of the spec's `report.claims` (effect ± s.e., Welch p, the paper's
    effect); a table per grid and dataset (rows and columns from the spec's `report:` section)
    with mean ± std over seeds, seed counts, Welch t-tests against the baseline and the paper's
    values; missing cells are marked. Files go to --out and to the sweep's parent run.
    """
    if select not in (None, *SELECTION_NOTES):
        typer.echo(f"error: --select: {select!r} is not one of {', '.join(SELECTION_NOTES)}", err=True)
        raise typer.Exit(code=2)
    try:
        report = write_report(tracking_uri or default_tracking_uri(name), name, out, fmt, compare_to, log, select)
    except ReportError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(report.text)
    if not report.tables:
        typer.echo("no quantise or real-valued trials in this sweep yet", err=True)
    typer.echo("wrote " + ", ".join(str(path) for path in report.files), err=True)
