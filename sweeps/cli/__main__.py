"""`python -m sweeps.cli`, as `bnew`."""

from sweeps.cli import app

app()
