"""Sweeps over the BNEW trainer: a YAML spec (`spec`), its stages (`plan`), a Ray Tune runner
(`execute`), MLflow records (`tracking`) and per-stage progress (`status`)."""
