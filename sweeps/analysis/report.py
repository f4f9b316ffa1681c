"""Sweep reports from the runs a sweep logged to MLflow: the claims' verdicts, one table per grid
and dataset (`sweeps.analysis.tables`), the searches' best params, the distillation teachers,
the failed trials and the figures, written to a folder and logged to the parent run under
`report/`. Reads records; never Ray."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import ValidationError

from bnew_core.config import BnewError, DataConfig
from sweeps.analysis import cost, searches
from sweeps.analysis.claims import (
    ClaimResult,
    claims_frame,
    claim_frame,
    claims_seeds_frame,
    evaluate_claims,
    render_claims_markdown,
)
from sweeps.analysis.plots import claims_figure, save_figure, table_figures
from sweeps.analysis.rounds import judge_round, recorded_rounds, rounds_text
from sweeps.analysis.tables import (
    SELECTION_NOTES,
    ReportError,
    Table,
    build_tables,
    cells_frame,
    final_metric,
    load_paper_tables,
    render_latex,
    render_markdown,
    report_layout,
    result_trials,
)
from sweeps.core.schema import FINAL_PHASES
from sweeps.core.spec import ReportSpec, SweepSpec, load_spec, parse_spec, preset_names
from sweeps.records.sweep_runs import SweepRuns, load_sweep

FORMAT_SUFFIX: dict[str, str] = {"md": "md", "csv": "csv", "latex": "tex"}
"""Report formats and the suffix of their file."""
CLAIMS_PLOT = "claims.png"
"""The figure to look at first: every claim's effect with its 95% CI beside the paper's."""
def subset_text(data: DataConfig, split: Literal["train", "test"]) -> str:
    limit = data.train_limit if split == "train" else data.test_limit
    return "all" if limit is None else f"{limit}, a random subset (seed {data.subset_seed(split)})"


def data_note(spec: dict[str, Any]) -> str:
    """The images the results come from, per dataset and final phase, from the stored spec's data
    settings (base < phases.<phase> < datasets.<name>, as the plan merges them): every p-value
    and interval is about the spread over seeds on these images, not over other images."""
    def section(mapping: Any, *keys: str) -> dict[str, Any]:
        for key in keys:
            mapping = mapping.get(key) if isinstance(mapping, dict) else None
        return mapping if isinstance(mapping, dict) else {}

    lines = []
    for name in section(spec, "axes").get("dataset") or ["digits"]:
        described: dict[str, list[str]] = {}
        for phase in FINAL_PHASES:
            settings = {**section(spec, "base", "data"), **section(spec, "phases", phase, "data"),
                        **section(spec, "datasets", name), "name": name}
            try:
                data = DataConfig.model_validate(settings)
            except ValidationError:  # a spec of another version
                continue
            held_out = (f" of those left after holding out {data.val_size} for validation (split seed "
                        f"{data.split_seed})" if data.val_size else "")
            text = (f"training images: {subset_text(data, 'train')}{held_out}; "
                    f"test images: {subset_text(data, 'test')}")
            described.setdefault(text, []).append(phase)
        for text, phases in described.items():
            lines.append(f"- `{name}`{'' if len(described) == 1 else ' (' + ', '.join(phases) + ')'}: {text}.")
    if not spec or not lines:
        return "Data: the sweep's stored spec gives no readable data settings, so its image subsets are unknown.\n"
    return "\n".join([
        "Data of the result runs:", "", *lines, "",
        "Every p-value and confidence interval below is about these images only: it measures how results "
        "vary over seeds (each seed's pretrained model, initialisation and batch order) on this training set "
        "and this test set, not how they would vary over other draws of training or test images.", "",
    ])


def tuning_searches(sweep: SweepRuns) -> str:
    """The Markdown of the sweep's searches, if it tuned; its tables then keep, per tuned cell,
    only the runs of the best params."""
    if not sweep.spec.get("search"):
        return ""
    spec = parse_spec(sweep.spec, f"{sweep.name}/spec.yaml")
    summaries = searches.summarise(sweep.trials, spec)
    sweep.trials = searches.best_runs_only(sweep.trials, spec)
    return searches.render_markdown(summaries, spec.search.metric) if summaries else ""


def failed_trials(sweep: SweepRuns) -> pd.DataFrame:
    """FAILED trials that no later finished run of the same stage key replaced, with their error."""
    trials = sweep.trials
    finished_keys = set(trials.loc[trials.status == "FINISHED", "stage_key"]) - {""}
    failed = trials[(trials.status == "FAILED") & ~trials.stage_key.isin(finished_keys)]
    # log_tail: the last lines of the trial's log (sweeps.records.trial_log), where it recorded them
    failed = failed.assign(log_tail=failed["log_tail"] if "log_tail" in failed else "")
    return failed[["run_name", "grid", "stage", "optimiser", "ablation", "seed", "error", "log_tail"]].reset_index(drop=True)


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




@dataclass
class Report:
    """What `save_report` wrote."""

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


def claim_results(results: pd.DataFrame, layout: ReportSpec, sweep: SweepRuns) -> tuple[list[ClaimResult], str]:
    """The spec's claims judged on the finished result runs (`claims.claim_frame`), and the
    "rounds" lines of a sweep that ran seed rounds: its claims then read the group-sequential
    boundary of the round each stopped at, on that round's seeds (`analysis.rounds`)."""
    if not layout.claims:
        return [], ""
    frame, paper = claim_frame(results, layout.claims), load_paper_tables()
    played = recorded_rounds(sweep.parent_tags)
    spec = parse_spec(sweep.spec, f"{sweep.name}/spec.yaml") if played else None
    reached = {look.claim: look.seeds for look in played[-1].looks} if played else {}
    if spec is None or spec.axes.seed_rounds is None or {claim.name for claim in layout.claims} - set(reached):
        return evaluate_claims(frame, layout.claims, paper, layout.correction), ""
    _, judged = judge_round(frame, spec.model_copy(update={"report": layout}), reached, paper, played[-1].number)
    return judged, rounds_text(played, spec.axes.seed_rounds)


def render(
    tables: list[Table], failed: pd.DataFrame, fmt: str, sweep_name: str,
    claims: list[ClaimResult] = (), teachers: pd.DataFrame | None = None, data: str = "", rounds: str = "",
) -> str:
    """The tables in one format; Markdown also gives the data the results come from (`data`,
    first), the claims' verdicts (after the `rounds` of seeds that decided them, if any), the
    teachers and the failed trials."""
    if fmt == "csv":
        return cells_frame(tables).to_csv(index=False)
    if fmt == "latex":
        return "\n".join(render_latex(table) for table in tables)
    sections = [f"# Sweep report: {sweep_name}", "", data]
    if claims:
        layout = tables[0].layout if tables else ReportSpec()
        note = f"`{layout.metric}` at {SELECTION_NOTES[layout.select]}, report.select: {layout.select}"
        sections += [render_claims_markdown(claims, note), rounds, f"![claims]({CLAIMS_PLOT})", ""]
    sections += [render_markdown(table) for table in tables]
    if teachers is not None:
        sections.append(render_teachers_markdown(teachers))
    return "\n".join(sections + [render_failed_markdown(failed)])


@dataclass
class SweepReport:
    """A sweep's claims, tables, failed trials and teachers, computed from MLflow and not written
    anywhere (`build_report`; `sweeps.report`); `save_report` writes it as `bnew sweep report` does."""

    sweep: SweepRuns
    layout: ReportSpec
    tables: list[Table]
    claims: list[ClaimResult]
    rounds: str
    """The rounds of seeds that decided the claims (Markdown), if the sweep ran rounds."""
    failed: pd.DataFrame
    teachers: pd.DataFrame
    searches: str
    """The tuned cells' searches (Markdown), if any."""

    @property
    def claims_frame(self) -> pd.DataFrame:
        """One row per claim: its contrast, effect, test, p-values and verdict."""
        return claims_frame(self.claims)

    @property
    def tables_frame(self) -> pd.DataFrame:
        """One row per cell of every table: mean, std and seeds of the reported metric, its test."""
        return cells_frame(self.tables)

    def figures(self) -> dict[str, Any]:
        """The report's matplotlib figures by file stem: the claims' (if any) and each table's
        four (its per-epoch curves read every run's history from MLflow)."""
        title = f"{self.sweep.name}: claims, {self.layout.metric}"
        figures = {Path(CLAIMS_PLOT).stem: claims_figure(self.claims, title)} if self.claims else {}
        for table in self.tables:
            figures.update(table_figures(self.sweep, table))
        return figures

    def text(self, fmt: str = "md") -> str:
        """The report in one format (md, csv, latex), as `bnew sweep report` writes it."""
        if fmt not in FORMAT_SUFFIX:
            raise ReportError(f"unknown format {fmt!r}: expected one of {sorted(FORMAT_SUFFIX)}")
        text = render(self.tables, self.failed, fmt, self.sweep.name, self.claims, self.teachers,
                      data_note(self.sweep.spec), self.rounds)
        if fmt == "md":
            text += ("\n" + self.searches if self.searches else "") + "\n" + cost.hours_markdown(self.sweep)
        return text


def build_report(sweep_name: str, tracking_uri: str | None = None, compare_to: str | None = None,
                 select: str | None = None) -> SweepReport:
    """The sweep's claims and tables from its MLflow runs at `tracking_uri` (default: where `bnew
    sweep run` tracked it), computed without writing (`sweeps.report`). `select` overrides the
    spec's `report.select`; `compare_to`: the row or column label every cell is tested against."""
    sweep = load_sweep(tracking_uri or default_tracking_uri(sweep_name), sweep_name)
    layout = report_layout(sweep, select)
    results = result_trials(sweep, layout)
    tables = build_tables(sweep, compare_to, layout, results)
    try:
        claims, rounds = claim_results(results[0], layout, sweep)
    except BnewError as exc:
        raise ReportError(str(exc)) from None
    return SweepReport(sweep, layout, tables, claims, rounds, failed_trials(sweep), teacher_runs(sweep),
                       tuning_searches(sweep))


def save_report(report: SweepReport, out_dir: Path, fmt: str = "md", log_artifacts: bool = True) -> Report:
    """Write the report (its text in `fmt`, the claims' CSVs, the failed trials, the plots) to
    `out_dir` and log the files to the sweep's parent run under `report/`."""
    text = report.text(fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"report.{FORMAT_SUFFIX[fmt]}"
    table_path.write_text(text)
    files = [table_path]
    if report.claims:
        claims_path, seeds_path = out_dir / "claims.csv", out_dir / "claims_seeds.csv"
        report.claims_frame.to_csv(claims_path, index=False)
        claims_seeds_frame(report.claims).to_csv(seeds_path, index=False)
        files += [claims_path, seeds_path]
    if not report.failed.empty:
        failed_path = out_dir / "failed_trials.csv"
        report.failed.to_csv(failed_path, index=False)
        files.append(failed_path)
    files += [save_figure(figure, out_dir / f"{name}.png") for name, figure in report.figures().items()]
    if log_artifacts:
        report.sweep.log_files(files, "report")
    return Report(report.tables, report.failed, text, files, report.claims)


def write_report(
    tracking_uri: str,
    sweep_name: str,
    out_dir: Path | None = None,
    fmt: str = "md",
    compare_to: str | None = None,
    log_artifacts: bool = True,
    select: str | None = None,
) -> Report:
    """`build_report`, then `save_report` to `out_dir` (default `reports/<sweep>`): what `bnew
    sweep report` does."""
    if fmt not in FORMAT_SUFFIX:  # before MLflow is read
        raise ReportError(f"unknown format {fmt!r}: expected one of {sorted(FORMAT_SUFFIX)}")
    report = build_report(sweep_name, tracking_uri, compare_to, select)
    return save_report(report, Path(out_dir or Path("reports") / sweep_name), fmt, log_artifacts)


def default_tracking_uri(sweep_name: str) -> str:
    """Where `bnew sweep run` tracked the sweep: its preset's tracking URI when the name is a
    preset's, else the sweep service's default store."""
    spec = load_spec(sweep_name) if sweep_name in preset_names() else SweepSpec(name=sweep_name)
    return spec.resolved_tracking_uri()
