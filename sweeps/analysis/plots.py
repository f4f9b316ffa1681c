"""The report's figures: per-epoch curves and bars of each table, the claims with their confidence
intervals, and a search's metric against each tuned param. Drawn as matplotlib `Figure` objects,
not through pyplot: no backend is chosen or changed (a notebook keeps its own), a notebook shows
them as they are (`SweepReport.figures`), and `save_figure` writes them as PNG."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sweeps.analysis.claims import CONTRADICTED, HOLDS, NOT_SHOWN, ClaimResult, wrapped_reason
from sweeps.analysis.tables import Table, has_paper_values
from sweeps.records.sweep_runs import SweepRuns

VERDICT_COLOURS = {HOLDS: "tab:green", NOT_SHOWN: "tab:gray", CONTRADICTED: "tab:red"}




def load_histories(sweep: SweepRuns, table: Table, metrics: list[str]) -> pd.DataFrame:
    """Per-epoch values of the table's runs: row, column, run_id, metric, step, value."""
    histories = {(run_id, metric): sweep.history(run_id, metric) for run_id in table.runs.run_id.unique()
                 for metric in metrics}
    records = [
        {"row": run.row, "column": run.column, "run_id": run.run_id, "metric": metric, "step": step, "value": value}
        for run in table.runs.itertuples()
        for metric in metrics
        for step, value in histories[(run.run_id, metric)]
    ]
    return pd.DataFrame(records, columns=["row", "column", "run_id", "metric", "step", "value"])


def new_figure(width: float, height: float) -> Any:
    """An empty matplotlib Figure of that size in inches, outside pyplot's figure manager."""
    from matplotlib.figure import Figure  # heavy: only the calls that draw

    return Figure(figsize=(width, height))


def save_figure(figure: Any, path: Path) -> Path:
    figure.savefig(path, dpi=100)
    return path


def row_colours(table: Table) -> dict[str, Any]:
    """One colour per row label, the same in every panel and figure."""
    from matplotlib import colormaps  # heavy

    palette = colormaps["tab10" if len(table.row_labels) <= 10 else "tab20"]
    return {row: palette(index % palette.N) for index, row in enumerate(table.row_labels)}


def histories_figure(histories: pd.DataFrame, table: Table, metrics: list[str]) -> Any:
    """A panel per (metric, column): mean over seeds per epoch, one line per row, ±std band."""
    from matplotlib.lines import Line2D  # heavy
    from matplotlib.ticker import MaxNLocator  # heavy
    colours = row_colours(table)
    figure = new_figure(4.5 * len(table.column_labels), 3.2 * len(metrics))
    axes = figure.subplots(len(metrics), len(table.column_labels), squeeze=False, sharex="col")
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
    return figure


def bars_figure(table: Table) -> Any:
    """Grouped bars of the table (a group per column, a bar per row) with ±std error bars and
    the paper's values as black markers."""
    colours = row_colours(table)
    figure = new_figure(max(5.0, 2.0 + 0.4 * len(table.column_labels) * len(table.row_labels)), 4)
    ax = figure.subplots()
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
    return figure


def table_figures(sweep: SweepRuns, table: Table) -> dict[str, Any]:
    """The four figures of a table by file stem (`<table slug>_<name>`): accuracy, distance to
    binary and lambda, flips (per epoch, from the runs' histories), bars."""
    metric = table.layout.metric
    panels = {"accuracy": [metric], "dist_lambda": ["dist_to_binary", "lambda"], "flips": ["flip_fraction"]}
    histories = load_histories(sweep, table, sorted({m for ms in panels.values() for m in ms}))
    figures = {f"{table.slug}_{name}": histories_figure(histories[histories.metric.isin(ms)], table, ms)
               for name, ms in panels.items()}
    return {**figures, f"{table.slug}_bars": bars_figure(table)}


def claims_figure(results: list[ClaimResult], title: str) -> Any:
    """Each claim's effect with its 95% CI, coloured by verdict, the paper's effect in black."""
    from matplotlib.lines import Line2D  # heavy

    labels = [f"{result.claim.name}\n{wrapped_reason(result)}" for result in results]
    figure = new_figure(12, 0.25 * sum(label.count("\n") + 1 for label in labels) + 1.8)
    ax = figure.subplots()
    positions = np.arange(len(results))[::-1]
    for y, result in zip(positions, results):
        low, high = result.ci95()
        colour = VERDICT_COLOURS[result.verdict]
        if not math.isnan(low):
            ax.plot([low, high], [y, y], color=colour, linewidth=2)
        if not math.isnan(result.effect):
            ax.plot(result.effect, y, "o", color=colour)
        ax.plot(result.paper_effect, y, "D", color="black", markersize=5)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(positions, labels, fontsize=7)
    ax.set_xlabel("effect, accuracy points")
    ax.set_title(title, fontsize=10)
    legend = [Line2D([], [], color=colour, marker="o", label=f"this sweep, 95% CI: {name}")
              for name, colour in VERDICT_COLOURS.items()]
    legend.append(Line2D([], [], color="black", marker="D", linestyle="", label="the paper (CIFAR-100)"))
    ax.legend(handles=legend, fontsize=7, loc="best")
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return figure


def plot_search(frame: pd.DataFrame, param: str, metric: str, title: str, log_scale: bool) -> bytes:
    """A search's `metric` against one tuned `param`, one point per trial (`frame`: a search's
    history, `sweeps.analysis.searches.search_history`), trials stopped early marked apart. PNG bytes."""
    figure = new_figure(5, 3.5)
    axis = figure.subplots()
    for stopped, marker in ((False, "o"), (True, "x")):
        shown = frame[frame["stopped_early"] == stopped]
        axis.scatter(shown[param], shown[metric], marker=marker,
                     label="stopped early (its last epoch)" if stopped else "full budget")
    if log_scale:
        axis.set_xscale("log")
    axis.set(xlabel=param, ylabel=metric)
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
