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
import inspect
import os
import types
from typing import Any, Callable

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


def api_function(name: str) -> Callable[..., Any]:
    """The API's function `name`, its module imported now (torch, Ray, MLflow load on first use)."""
    module, function = API[name]
    return getattr(importlib.import_module(module), function)


def __getattr__(name: str) -> Any:
    if name not in API:
        raise AttributeError(f"module 'sweeps' has no attribute {name!r}")
    function = api_function(name)
    globals()[name] = function
    return function


class CallableModule(types.ModuleType):
    """A module that is also one of the API's functions: `sweeps.run` is the layer `sweeps/run/`
    (`import sweeps.run.driver` works as ever) and `sweeps.run(spec)` runs a sweep;
    `sweeps.plan` is the import shim `sweeps/plan.py` and `sweeps.plan(spec)` plans one."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return api_function(self.__name__.removeprefix("sweeps."))(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(api_function(self.__name__.removeprefix("sweeps.")))


for _name in ("plan", "run"):  # both modules are light: an empty package and a shim over core
    importlib.import_module(f"sweeps.{_name}").__class__ = CallableModule
