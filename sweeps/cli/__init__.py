"""The top layer: the `bnew` command line (entry point `sweeps.cli:app`)."""

from sweeps.cli.app import app

__all__ = ["app"]
