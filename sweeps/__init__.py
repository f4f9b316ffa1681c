"""bnew-sweep: plan, run, track and report sweeps of binary neural networks.

Layers, each importing only those below it (checked by import-linter, `pyproject.toml`):
`core` (spec, plan, schema; no Ray, MLflow or torch) < `records` (MLflow) < `analysis`
(tables, statistics, claims, status) < `run` (Ray Tune, Jobs) < `ui` (console) < `cli`.
`execute`, `console`, `tuning`, `spec` and `plan` here are import shims for experiments
recorded before the layers (one release)."""
