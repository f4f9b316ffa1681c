"""The report's figures, drawn with matplotlib on the Agg backend (files only, no display): per-epoch
curves and bars of each table, the claims with their confidence intervals, and a search's metric
against each tuned param."""

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


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # heavy: only the commands that draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy

    return plt


def row_colours(table: Table) -> dict[str, Any]:
    """One colour per row label, the same in every panel and figure."""
    palette = pyplot().get_cmap("tab10" if len(table.row_labels) <= 10 else "tab20")
    return {row: palette(index % palette.N) for index, row in enumerate(table.row_labels)}


def plot_histories(histories: pd.DataFrame, table: Table, metrics: list[str], path: Path) -> Path:
    """A panel per (metric, column): mean over seeds per epoch, one line per row, ±std band."""
    plt = pyplot()
    from matplotlib.lines import Line2D  # heavy, after the backend is chosen
    from matplotlib.ticker import MaxNLocator  # heavy
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


def plot_claims(results: list[ClaimResult], path: Path, title: str) -> Path:
    """Each claim's effect with its 95% CI, coloured by verdict, the paper's effect in black."""
    plt = pyplot()
    from matplotlib.lines import Line2D  # heavy, after the backend is chosen

    labels = [f"{result.claim.name}\n{wrapped_reason(result)}" for result in results]
    figure, ax = plt.subplots(figsize=(12, 0.25 * sum(label.count("\n") + 1 for label in labels) + 1.8))
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
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_search(frame: pd.DataFrame, param: str, metric: str, title: str, log_scale: bool) -> bytes:
    """A search's `metric` against one tuned `param`, one point per trial (`frame`: a search's
    history, `sweeps.analysis.searches.search_history`), trials stopped early marked apart. PNG bytes."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(5, 3.5))
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
    plt.close(figure)
    return buffer.getvalue()
