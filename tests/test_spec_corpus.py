"""Malformed sweep specs (tests/bad_specs/*.yaml): each is rejected by `bnew sweep plan`,
`bnew sweep run` and `bnew sweep submit` alike, with exit status 2 and one line naming the
key, before Ray or MLflow start. Each file says the text its error line must contain (`# error: ...`) and, if not every
command rejects it, which do (`# commands: run`: a grid over the size limit is shown by `plan`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sweeps.cli import app

BAD_SPECS = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))
COMMANDS = {"plan": ["sweep", "plan", "{spec}"], "run": ["sweep", "run", "{spec}", "--local"],
            "submit": ["sweep", "submit", "{spec}", "--address", "http://127.0.0.1:9"],
            "debug": ["sweep", "run", "{spec}", "--debug"]}
"""Command lines, `{spec}` standing for the spec's path. `submit` checks what does not depend on
the machine (a storage path or a dataset root is the cluster's, not this one's); nothing listens
at its address, so a spec that passed would fail on the connection, not with the spec's line."""


def header(path: Path, field: str) -> str | None:
    prefix = f"# {field}: "
    return next((line.removeprefix(prefix) for line in path.read_text().splitlines() if line.startswith(prefix)), None)


CASES = [
    pytest.param(path, command, id=f"{path.stem}-{command}")
    for path in BAD_SPECS
    for command in (header(path, "commands") or "plan run submit").split()
    if command in COMMANDS
]


def test_corpus_is_large_and_every_spec_says_what_it_expects() -> None:
    assert len(BAD_SPECS) >= 40
    assert all(header(path, "error") for path in BAD_SPECS)


@pytest.mark.parametrize("path, command", CASES)
def test_bad_spec_is_one_line_and_exit_2_before_ray_or_mlflow(
    path: Path, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    for variable in ("MLFLOW_TRACKING_URI", "BNEW_STORAGE_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    result = CliRunner().invoke(app, [word.format(spec=path) for word in COMMANDS[command]])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert header(path, "error") in lines[0]
    assert result.stdout == ""
    assert not (tmp_path / ".bnew").exists()  # no MLflow store, no Tune storage
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_a_grid_over_the_size_limit_plans_and_runs_with_yes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.cli.common import load_sweep_plan

    monkeypatch.setenv("BNEW_PROJECT_DIR", str(tmp_path))
    spec = str(Path(__file__).parent / "bad_specs" / "grid_over_size_limit.yaml")
    _, plan = load_sweep_plan(spec, None, None, yes=True)
    assert len(plan.trial_roles()) == 1200
    refused = CliRunner().invoke(app, ["sweep", "plan", spec, "--no-lookup"])
    assert refused.exit_code == 2 and "1200 trials, more than 1000" in refused.stderr
    shown = CliRunner().invoke(app, ["sweep", "plan", spec, "--no-lookup", "--yes"])
    assert shown.exit_code == 0 and "1200 trials" in shown.stdout


def test_a_confirmed_submission_passes_yes_to_the_driver_on_the_cluster() -> None:
    """`submit --yes` checks the size limit here and confirms it for the job's `bnew sweep run`."""
    from sweeps.run.jobs import entrypoint

    assert entrypoint("run", "big", None, None, yes=True).endswith("big.yaml --yes")
    assert "--yes" not in entrypoint("resume", "small", 2, None)
