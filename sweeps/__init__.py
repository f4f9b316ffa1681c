"""bnew-sweep: plan, run, track and report sweeps of binary neural networks.

From Python, the five calls the CLI's commands take too (each imports what it needs when first
used, so `import sweeps` loads no torch, Ray or MLflow):

    spec = sweeps.load("demo", {"axes.seed": [0, 1]})   # validated, as `--set` validates
    planned = sweeps.plan(spec)                          # .stages (a DataFrame), .estimate
    outcome = sweeps.run(spec, local=True, max_epochs=2)
    frame = sweeps.results("demo")                       # one row per trial
    report = sweeps.report("demo")                       # .claims_frame, .tables_frame, .figures(), .text()

Layers, each importing only those below it (checked by import-linter, `pyproject.toml`):
`core` (spec, plan, schema; no Ray, MLflow or torch) < `records` (MLflow) < `analysis`
(tables, statistics, claims, status) < `run` (Ray Tune, Jobs) < `ui` (console) < `cli`.
`execute`, `console`, `tuning`, `spec` and `plan` here are import shims for experiments
recorded before the layers (one release)."""

from __future__ import annotations

import importlib
import os
import sys
import types
from typing import Any

API = {
    "load": ("sweeps.core.spec", "load_spec"),
    "plan": ("sweeps.run.planned", "plan"),
    "run": ("sweeps.ui.logged_run", "run"),
    "results": ("sweeps.analysis.results", "results"),
    "report": ("sweeps.analysis.report", "build_report"),
}
"""Each public name -> the module (in the layer it belongs to) and the function it is."""
__all__ = list(API)

# MLflow draws a progress bar for each input model and spec it downloads: lines of bars on the
# console, in --debug runs and in notebooks, that say nothing about the sweep. Ray workers started
# from here inherit the setting.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Nor two "View run ... / View experiment ..." lines each time a run on a tracking server ends
# (the sweep prints its experiment's link once; MLflow also spends a request on each).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class Package(types.ModuleType):
    """`sweeps.plan` and `sweeps.run` are the API's functions, though `sweeps/plan.py` and
    `sweeps/run/` are modules too: importing one of those sets the package's attribute of that
    name, which this package declines, so the name stays the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name not in API:
            raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
        module, function = API[name]
        value = getattr(importlib.import_module(module), function)
        super().__setattr__(name, value)
        return value


sys.modules[__name__].__class__ = Package
