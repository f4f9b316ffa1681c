"""The report's tables: one per grid and dataset, rows and columns named by the spec's `report:`
section, each cell the mean ± sample standard deviation over seeds, its seed count, a t-test
against a reference row (or column) and the paper's value; cells the spec plans but no finished
run fills are marked missing. Rendered as Markdown, LaTeX (booktabs) and CSV.

The test of a cell against its reference follows the design (`statistics.contrast_test`): two
cells that share seeds share pretrained models and batch orders, so they are compared seed by
seed (paired); cells sharing fewer than 2 seeds get Welch's test. A table's comparisons are one
family: their p-values are adjusted together (`report.correction`), and the star reads the
adjusted p."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from pydantic import ValidationError

from bnew_core.config import BnewError, format_validation_error
from sweeps.analysis.statistics import SIGNIFICANCE_LEVEL, ContrastTest, adjust_p_values, contrast_test
from sweeps.core.plan import grid_points
from sweeps.core.schema import FINAL_PHASES, tag_value
from sweeps.core.spec import ABLATIONS, PAPER_TABLES_PATH, ReportSpec, parse_spec
from sweeps.records.model_exports import BINARY_WEIGHTS_METRIC, size_metric
from sweeps.records.sweep_runs import TRIAL_COLUMNS, SweepRuns

REAL = "real"
"""Stage and optimiser name of the real-valued network's runs."""
REAL_ROW = "real_valued"
"""Row label of the real-valued network (the key tables.json uses for Table 2)."""
PAPER_DATASET = "cifar100"
"""Every table of the paper is CIFAR-100: paper values are shown beside CIFAR-100 tables only."""
NO_COLUMN = "all"
"""Column label of a table whose layout has no column axes."""
SIZE_METRICS = {"model_bin_bytes": size_metric("model.bin"), "binary_weight_bytes": BINARY_WEIGHTS_METRIC}
"""Columns of `Table.runs` holding what `bnew sweep export` logged on the run holding each
trial's model: the exported model.bin's bytes and the bytes of its 1-bit binary weights."""
RUN_COLUMNS = ["run_id", "row", "column", "seed", "value", *SIZE_METRICS]
SIZE_HEADER = "model.bin bytes"
"""Header of the column beside each column label once any run of the table was exported."""


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
    """Indexed by (row, column): n, mean, std, test (`paired`, `welch`, or '' without a p),
    test_reason, p_value, p_adjusted (over the table's comparisons), significant (p_adjusted <
    alpha), paper_mean, paper_std, status (`ok`; `missing`: planned, no finished run; `n/a`: not
    planned, no run)."""
    runs: pd.DataFrame
    """Finished runs behind the cells: run_id, row, column, seed, value, and SIZE_METRICS (NaN:
    not exported)."""
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
    columns = frame.reindex(columns=[axis if axis in TRIAL_COLUMNS else f"param.{axis}" for axis in axes], fill_value="")
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
            return tag_value(axis, ABLATIONS.get(point["ablation"], {}).get("distillation", point["distillation"]))
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


def best_val_metric(sweep: SweepRuns, run_id: str, metric: str) -> float | None:
    """`metric` at the run's epoch of best validation accuracy; None without a validation history."""
    validation = dict(sweep.history(run_id, VALIDATION_METRIC))
    if not validation:
        return None
    best_epoch = min(validation, key=lambda step: (-validation[step], step))
    return dict(sweep.history(run_id, metric)).get(best_epoch, math.nan)


def selected_values(sweep: SweepRuns, trials: pd.DataFrame, layout: ReportSpec) -> tuple[pd.Series, int]:
    """The reported value of each trial under `layout.select`, and how many best_val trials had no
    validation split (those report their final epoch)."""
    finals = pd.Series([final_metric(metrics, layout.metric) for metrics in trials.metrics], index=trials.index)
    if layout.select == "final":
        return finals, 0
    chosen = {index: best_val_metric(sweep, run_id, layout.metric) for index, run_id in trials.run_id.items()}
    without = [index for index, value in chosen.items() if value is None]
    return pd.Series({index: finals[index] if value is None else value for index, value in chosen.items()},
                     index=trials.index, dtype=float), len(without)


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
        .reindex(columns=RUN_COLUMNS)
        .reset_index(drop=True)
    )

    reference = compare_to or layout.baseline
    if reference not in row_labels and reference not in column_labels:
        reference = None
    samples = {key: dict(zip(map(str, group.seed), group.value)) for key, group in runs.groupby(["row", "column"])}
    tests = reference_tests(samples, itertools.product(row_labels, column_labels), reference, row_labels)
    adjusted = dict(zip(tests, adjust_p_values([test.p_value for test in tests.values()], layout.correction)))
    records = []
    for row, column in itertools.product(row_labels, column_labels):
        sample = np.array(list(samples.get((row, column), {}).values()), dtype=float)
        paper_value = paper_table.get("real_valued") if row == REAL_ROW else paper_rows.get(row, {}).get(column)
        test = tests.get((row, column))
        tested = test is not None and not math.isnan(test.p_value)
        p_adjusted = float(adjusted.get((row, column), math.nan))
        planned = (row, None if row == REAL_ROW else column) in expected
        records.append(
            {
                "row": row,
                "column": column,
                "n": len(sample),
                "mean": float(np.mean(sample)) if len(sample) else math.nan,
                "std": float(np.std(sample, ddof=1)) if len(sample) > 1 else math.nan,
                "test": test.test if tested else "",
                "test_reason": test.reason if tested else "",
                "p_value": test.p_value if test else math.nan,
                "p_adjusted": p_adjusted,
                "significant": bool(p_adjusted < SIGNIFICANCE_LEVEL),
                "paper_mean": paper_value[0] if paper_value else math.nan,
                "paper_std": paper_value[1] if paper_value else math.nan,
                "status": "ok" if len(sample) else ("missing" if planned else "n/a"),
            }
        )
    cells = pd.DataFrame(records).set_index(["row", "column"])
    return Table(grid, dataset, layout, reference, row_labels, column_labels, cells, runs)


def reference_tests(samples: dict[Cell, dict[str, float]], cells: Iterable[Cell], reference: str | None,
                    row_labels: list[str]) -> dict[Cell, ContrastTest]:
    """Each cell with values against its reference (same column for a reference row, same row
    for a reference column), where the reference has values too: the table's family of tests."""
    if reference is None:
        return {}
    tests = {}
    for row, column in cells:
        reference_key = (reference, column) if reference in row_labels else (row, reference)
        if reference_key != (row, column) and (row, column) in samples and reference_key in samples:
            tests[(row, column)] = contrast_test((1, -1), (samples[(row, column)], samples[reference_key]))
    return tests


def report_layout(sweep: SweepRuns, select: str | None = None) -> ReportSpec:
    """The spec's layout, with `select` (from the command line) instead of the spec's when given."""
    layout = read_layout(sweep.spec)
    return layout if select is None else layout.model_copy(update={"select": select})


def holder_metrics(sweep: SweepRuns, run_id: str) -> dict[str, float]:
    """The metrics of a run outside the sweep's trials (one a linked trial reused); {} if the store lost it."""
    try:
        return dict(sweep.tracker.client.get_run(run_id).data.metrics)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":  # an unreachable store: the caller's to report
            raise
        return {}


def export_sizes(sweep: SweepRuns, trials: pd.DataFrame) -> pd.DataFrame:
    """SIZE_METRICS of each finished quantise trial's exported model, read from the run holding
    its model (a linked trial's is the run it reused, maybe another sweep's); NaN where none."""
    metrics = dict(zip(sweep.trials.run_id, sweep.trials.metrics))
    exportable = trials[(trials.stage != REAL) & (trials.status == "FINISHED")]
    metrics |= {holder: holder_metrics(sweep, holder) for holder in set(exportable.model_run_id) - set(metrics)}
    return pd.DataFrame(
        [{column: metrics[holder].get(metric, math.nan) for column, metric in SIZE_METRICS.items()}
         for holder in exportable.model_run_id],
        index=exportable.index, columns=list(SIZE_METRICS), dtype=float,
    ).reindex(trials.index)


def result_trials(sweep: SweepRuns, layout: ReportSpec) -> tuple[pd.DataFrame, int]:
    """The result trials (stages quantise and real) with their reported `value`, and how many of
    them lacked the validation split `select: best_val` needs."""
    results = sweep.trials[sweep.trials.stage.isin(FINAL_PHASES)]
    values, without_validation = selected_values(sweep, results, layout)
    return results.assign(value=values), without_validation


def build_tables(
    sweep: SweepRuns, compare_to: str | None = None, layout: ReportSpec | None = None,
    results: tuple[pd.DataFrame, int] | None = None,
) -> list[Table]:
    """One table per grid and dataset: the planned ones and those the sweep's result trials
    (stages quantise and real) carry, each run with its export's sizes (`export_sizes`). With a
    readable spec every trial belongs to its grid."""
    layout = layout or report_layout(sweep)
    plan = planned_points(sweep.spec)
    results, without_validation = results or result_trials(sweep, layout)
    results = results.join(export_sizes(sweep, results))
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


def cell_text(cell: pd.Series, is_reference: bool, style: TextStyle, correction: str = "none") -> str:
    """`55.12 ± 0.40 (n=5) p=0.012, adj. 0.036*` (`Welch p=` where the test is Welch's); `— missing`
    without runs; `n/a` where the paper has none."""
    if cell.status != "ok":
        return style.missing if cell.status == "missing" else "n/a"
    spread = f" {style.plus_minus} {cell['std']:.2f}" if cell.n > 1 else ""
    text = f"{cell['mean']:.2f}{spread} (n={cell.n})"
    if is_reference:
        return text + " (ref)"
    if not math.isnan(cell.p_value):
        text += f" {'Welch p' if cell.test == 'welch' else 'p'}={cell.p_value:.3g}"
        text += "" if correction == "none" else f", adj. {cell.p_adjusted:.3g}"
        text += style.significant if cell.significant else ""
    return text


def paper_text(cell: pd.Series, style: TextStyle) -> str:
    """The paper's `mean ± std`, empty where the paper has no value for the cell."""
    return "" if math.isnan(cell.paper_mean) else f"{cell.paper_mean:.1f} {style.plus_minus} {cell.paper_std:.1f}"


def has_paper_values(table: Table) -> bool:
    return bool(table.cells.paper_mean.notna().any())


def has_exports(table: Table) -> bool:
    """Whether any run behind the table's cells has an exported model (`bnew sweep export`)."""
    return bool(table.runs.model_bin_bytes.notna().any())


def exported_sizes(table: Table) -> dict[Cell, pd.DataFrame]:
    """SIZE_METRICS of each cell's exported runs (cells without one left out)."""
    exported = table.runs.dropna(subset=["model_bin_bytes"])
    return {key: group[list(SIZE_METRICS)] for key, group in exported.groupby(["row", "column"])}


def bytes_text(values: pd.Series) -> str:
    """`353,644`, or `353,640–353,644` where a cell's exports differ."""
    low, high = int(values.min()), int(values.max())
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def size_text(sizes: pd.DataFrame | None) -> str:
    """`353,644 (1-bit weights 33,408; float32 1,069,056)`; empty without an export."""
    if sizes is None:
        return ""
    weights = sizes.binary_weight_bytes
    return (f"{bytes_text(sizes.model_bin_bytes)} (1-bit weights {bytes_text(weights)}; "
            f"float32 {bytes_text(32 * weights)})")


def wide_rows(table: Table, style: TextStyle) -> tuple[list[str], list[list[str]]]:
    """Header and body of the table as text: a column per label, each followed by the paper's
    and, where the sweep's trials were exported, by the model's bytes."""
    with_paper = has_paper_values(table)
    sizes = exported_sizes(table) if has_exports(table) else None
    header = [style.escape("/".join(table.layout.rows))]
    for column in table.column_labels:
        header += [style.escape(column)] + (["paper"] if with_paper else []) + ([SIZE_HEADER] if sizes else [])
    body = []
    for row in table.row_labels:
        line = [style.escape(row)]
        for column in table.column_labels:
            cell = table.cells.loc[(row, column)]
            line.append(cell_text(cell, table.reference in (row, column), style, table.layout.correction))
            if with_paper:
                line.append(paper_text(cell, style))
            if sizes:
                line.append(size_text(sizes.get((row, column))))
        body.append(line)
    return header, body


def selection_note(layout: ReportSpec, without_validation: int = 0) -> str:
    """Which epoch's value each run reports, as printed under every table."""
    note = f"Selection (report.select: {layout.select}): `{layout.metric}` at {SELECTION_NOTES[layout.select]}."
    if without_validation:
        note += (f" {without_validation} run(s) have no validation split (data.val_size = 0): "
                 "best_val needs one, so they report their final epoch.")
    return note


ADJUSTMENTS = {"holm": ("Holm", "bounds the chance of any false rejection"),
               "bh": ("Benjamini-Hochberg", "bounds the expected share of false rejections")}
"""report.correction: the method's name and what it controls, for the notes."""


def correction_text(correction: str, family: int, noun: str, short: bool = False) -> str:
    """How a family of p-values was adjusted, with its size (`noun`: claim, comparison): under
    each table and the claims (`short`: in a verdict's reason)."""
    members = f"{family} {noun}{'' if family == 1 else 's'}"
    if correction == "none":
        return "" if short else f"not adjusted for multiplicity (report.correction: none; {members} tested)"
    name, controls = ADJUSTMENTS[correction]
    if short:
        return f"{name} over {members}"
    return f"{name}-adjusted over the {members} tested ({controls}; report.correction: {correction})"


def table_note(table: Table) -> str:
    """What the cells and p-values mean, and which epoch they report."""
    note = "Mean ± sample std over n seeds; missing: planned, no finished run; n/a: not planned."
    if table.reference is None:
        note += " No reference row or column: no significance tests."
    else:
        where = "column" if table.reference in table.row_labels else "row"
        tested = table.cells[table.cells.test != ""]
        dropped = int(tested.test_reason.str.contains("left out").sum())
        note += (f" p: two-sided t-test against `{table.reference}` in the same {where}, paired by seed (the "
                 "per-seed difference) where the two cells share at least 2 seeds, else Welch's (`Welch p`; "
                 f"{int((tested.test == 'welch').sum())} of {len(tested)} here)")
        if dropped:
            note += f"; {dropped} paired test(s) left out runs of seeds the other cell lacks"
        adjusted = table.layout.correction != "none"
        note += (f". {'adj. (this table is one family): ' if adjusted else ''}"
                 f"{correction_text(table.layout.correction, len(tested), 'comparison')}; "
                 f"* {'adjusted ' if adjusted else ''}p < {SIGNIFICANCE_LEVEL}.")
    if has_exports(table):
        note += (f" {SIZE_HEADER}: the size of model.bin, the weights file of the OpenVINO IR that `bnew sweep "
                 f"export` wrote for the cell's exported runs ({SIZE_METRICS['model_bin_bytes']}, read from the run "
                 "holding each model); in brackets the bytes its binary weights take at 1 bit each "
                 f"({SIZE_METRICS['binary_weight_bytes']}) and what those weights would take as float32 (32 times "
                 "as many); empty: no exported run.")
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
    "grid", "dataset", "row", "column", "n", "mean", "std", "p_value", "p_adjusted", "significant", "test",
    "test_reason", "correction", "reference", "paper_mean", "paper_std", "status", "seed_values",
]


def seed_values_text(seeds: Any, values: Any) -> str:
    """`0:56.0 1:56.4 2:55.9`: a cell's value per seed, in seed order and full precision, so the
    CSV can be re-analysed (paired by seed, or not)."""
    pairs = sorted(zip(map(str, seeds), values), key=lambda pair: natural_key(pair[0]))
    return " ".join(f"{seed}:{float(value)!r}" for seed, value in pairs)


def cells_frame(tables: list[Table]) -> pd.DataFrame:
    """Every cell of every table in long form (the CSV format), with its per-seed values and,
    where any table has exported runs, the exports' sizes (SIZE_METRICS, `low–high` where they differ)."""
    columns = CSV_COLUMNS + (list(SIZE_METRICS) if any(has_exports(table) for table in tables) else [])
    frames = []
    for table in tables:
        seeds = {key: seed_values_text(group.seed, group.value) for key, group in table.runs.groupby(["row", "column"])}
        sizes = exported_sizes(table)
        cells = table.cells.reset_index()
        keys = list(zip(cells.row, cells.column))
        frames.append(cells.assign(
            grid=table.grid, dataset=table.dataset, reference=table.reference, correction=table.layout.correction,
            seed_values=[seeds.get(key, "") for key in keys],
            **{column: [bytes_text(sizes[key][column]).replace(",", "") if key in sizes else "" for key in keys]
               for column in SIZE_METRICS},
        ))
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
