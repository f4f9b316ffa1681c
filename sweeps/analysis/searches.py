"""What a sweep's searches left in MLflow, read from the report's trial frame
(`sweeps.records.sweep_runs`): per tuned cell, how many trials ran, were stopped early and
failed, and the params whose runs finished their budget on every seed with the best mean
`search.metric`. The report keeps only those params' runs in its tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd

from sweeps.core.schema import CELL_TAG, STOPPED_EARLY_TAG, TAG_PREFIX
from sweeps.core.search import TunedCell, cell_params
from sweeps.core.spec import SweepSpec

CELL_COLUMN = CELL_TAG.removeprefix(TAG_PREFIX)
STOPPED_COLUMN = STOPPED_EARLY_TAG.removeprefix(TAG_PREFIX)


@dataclass
class CellSearch:
    """A cell's search, read from MLflow."""

    cell: str
    trials: int
    """Its runs: each suggested set of params once per seed."""
    samples: int
    """Suggested sets of params."""
    seeds: int
    stopped: int
    failed: int
    best_params: dict[str, str]
    """The params with the best mean of `search.metric` among those that finished their budget on every seed."""
    best_val: float | None
    """Their mean `search.metric` over the seeds, and their mean test accuracy."""
    best_test: float | None

    def shown_params(self) -> str:
        """The best params, floats to 4 digits (`trials.csv` on the parent run has them whole)."""
        return ", ".join(f"{key}={shorter(value)}" for key, value in self.best_params.items()) or "-"


def shorter(value: str) -> str:
    try:
        return f"{float(value):.4g}" if "." in value or "e" in value else value
    except ValueError:
        return value


def searches_line(searches: list[CellSearch]) -> str:
    """The searches of a run in a few words, for its closing line."""
    return (f"{sum(s.trials for s in searches)} search trials in {len(searches)} cell{'s' if len(searches) > 1 else ''} "
            f"({sum(s.stopped for s in searches)} stopped early, {sum(s.failed for s in searches)} failed)")


def search_trials(trials: Any, cell: str) -> Any:
    """The rows of the report's trial frame that are `cell`'s search."""
    if CELL_COLUMN not in trials:
        return trials.iloc[0:0]
    return trials[trials[CELL_COLUMN] == cell]


def summarise(trials: Any, spec: SweepSpec) -> list[CellSearch]:
    """Per cell: how many trials ran, were stopped and failed, and the params whose runs finished
    their budget on every seed with the best mean of `search.metric`, with that mean and their
    mean test accuracy."""
    if CELL_COLUMN not in trials or spec.search is None:
        return []
    metric, sign = spec.search.metric, 1 if spec.search.mode == "max" else -1
    summaries = []
    for cell in sorted(set(trials[CELL_COLUMN]) - {""}):
        search = search_trials(trials, cell)
        params = [key for key in search if key.startswith("param.") and (search[key] != "").any()]
        seeds = search["seed"].nunique()
        means = mean_over_seeds(search, params, metric)
        complete = means[means["seeds"] == seeds]
        best = None if complete.empty else (sign * complete["val"]).idxmax()
        summaries.append(CellSearch(
            cell=cell, trials=len(search), samples=search.groupby(params).ngroups, seeds=seeds,
            stopped=int((search[STOPPED_COLUMN] != "").sum()) if STOPPED_COLUMN in search else 0,
            failed=int((search["status"] == "FAILED").sum()),
            best_params={} if best is None else dict(zip((key.removeprefix("param.") for key in params),
                                                         best if isinstance(best, tuple) else (best,))),
            best_val=None if best is None else float(complete.loc[best, "val"]),
            best_test=None if best is None else float(complete.loc[best, "test"]),
        ))
    return summaries


def mean_over_seeds(search: Any, params: list[str], metric: str) -> Any:
    """Per suggested params (the `params` columns): the mean `metric` and test accuracy of their
    finished runs, and how many seeds finished."""
    finished = search[(search["status"] == "FINISHED") & search["metrics"].map(lambda m: metric in m)]
    return pd.DataFrame({
        "val": finished["metrics"].map(lambda m: m[metric]),
        "test": finished["metrics"].map(lambda m: m.get("test_acc_binary", float("nan"))),
        **{key: finished[key] for key in params},
    }).groupby(params).agg(val=("val", "mean"), test=("test", "mean"), seeds=("val", "size"))


def best_runs_only(trials: Any, spec: SweepSpec) -> Any:
    """The trial frame without the search trials that are not their cell's best (the report's
    tables then hold, per cell, the best params on every seed)."""
    if CELL_COLUMN not in trials or spec.search is None:
        return trials
    keep = trials[CELL_COLUMN] == ""
    for summary in summarise(trials, spec):
        in_cell = trials[CELL_COLUMN] == summary.cell
        for key, value in summary.best_params.items():
            in_cell &= trials[f"param.{key}"] == value
        keep |= in_cell
    return trials[keep]


def render_markdown(summaries: list[CellSearch], metric: str) -> str:
    lines = ["## Tuning", "", "Per cell, the params with the best mean over the seeds (all trained to their budget).", "",
             f"| cell | best params | {metric} | test_acc_binary | trials (params x seeds) | stopped early | failed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        val = "-" if s.best_val is None else f"{s.best_val:.2f}"
        test = "-" if s.best_test is None else f"{s.best_test:.2f}"
        lines.append(f"| {s.cell} | {s.shown_params()} | {val} | {test} | {s.samples} x {s.seeds} | {s.stopped} | {s.failed} |")
    return "\n".join(lines) + "\n"


def type_of(spec: SweepSpec, key: str) -> Callable[[str], Any]:
    space = spec.tuned_params()[key]
    if space.randint is not None:
        return int
    if space.choice is not None:
        return lambda text: next(value for value in space.choice if str(value) == text)
    return float


def search_history(trials: pd.DataFrame, cell: TunedCell, spec: SweepSpec) -> pd.DataFrame:
    """Every trial of the cell's search: its run, seed, state, epochs run, `search.metric`, test
    accuracy and params (typed as the search space draws them), as `tuning/<cell>/trials.csv` keeps it."""
    metric = spec.search.metric
    search = search_trials(trials, cell.label)
    return pd.DataFrame({
        "run": search["run_name"], "seed": search["seed"], "status": search["status"],
        "stopped_early": search[STOPPED_COLUMN] != "" if STOPPED_COLUMN in search else False,
        "epochs": search["metrics"].map(lambda m: int(m.get("epoch", -1)) + 1),
        metric: search["metrics"].map(lambda m: m.get(metric)),
        "test_acc_binary": search["metrics"].map(lambda m: m.get("test_acc_binary")),
        **{key: search[f"param.{key}"].map(type_of(spec, key)) for key in cell_params(spec, cell.templates[0])},
    })
