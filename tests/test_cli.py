"""`bnew train` from the command line: help, a real run, and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def bnew(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PYTHONPATH": str(Path(__file__).parents[1]), "PATH": "/usr/bin:/bin",
                                            "HOME": str(cwd)})


def test_help_documents_the_fields(tmp_path: Path) -> None:
    result = bnew("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--optimiser", "--epochs", "--teacher", "--resume", "--set", "--download"):
        assert flag in result.stdout


def test_train_runs_and_resumes_from_the_command_line(tmp_path: Path) -> None:
    config = tmp_path / "trial.yaml"
    config.write_text("phase: quantise\noptimiser: {name: bnew, lambda_rate: 3.0}\nepochs: 2\n"
                      "data: {name: synthetic, synthetic_size: 128}\nbatch_size: 32\ndevice: cpu\n")
    result = bnew("train", str(config), "--output-dir", "out", "--quiet", "--set", "optimiser.freeze_epochs=1",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "final binary test accuracy" in result.stdout
    assert "freeze_epochs: 1" in (tmp_path / "out" / "config.yaml").read_text()


@pytest.mark.parametrize(
    "yaml_text, flags, expected",
    [
        ("phase: quantise\noptimiser: {name: bnew, gamma: 0.1}\n", [], "optimiser.bnew.gamma: Extra inputs"),
        ("phase: pretrain\nepochs: many\n", [], "epochs: Input should be a valid integer"),
        ("phase: pretrain\nmodel: {activation: tanh}\n", [], "model.activation: Input should be 'prelu' or 'relu'"),
        ("phase: quantise\n", [], "optimiser: required for the quantise phase"),
        ("phase: [unclosed\n", [], "not valid YAML"),
        ("phase: pretrain\ndata: {name: imagefolder, root: nowhere}\n", [], "data.root: nowhere/train is not a directory"),
        ("phase: pretrain\n", ["--resume", "garbage.pt"], "resume: garbage.pt is not a readable checkpoint"),
        ("phase: quantise\noptimiser: {name: ste}\n", ["--init", "garbage.pt"], "init_checkpoint: garbage.pt is not a readable"),
    ],
)
def test_bad_input_exits_with_one_line(tmp_path: Path, yaml_text: str, flags: list[str], expected: str) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    result = bnew("train", str(config), "--quiet", *flags, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = bnew("train", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "nope.yaml: config file not found" in result.stderr


def test_sweep_list_into_a_pipe_keeps_every_name_whole(tmp_path: Path) -> None:
    """What a user types from (preset names, grids) is never cut: plain lines outside a terminal."""
    from sweeps.core.spec import load_spec, preset_names

    result = bnew("sweep", "list", cwd=tmp_path)
    assert result.returncode == 0 and "…" not in result.stdout
    lines = result.stdout.splitlines()
    for name in preset_names():
        spec = load_spec(name)
        (line,) = [line for line in lines if line.split()[:1] == [name]]
        assert line.split()[1] == spec.grid_label and line.endswith(spec.description)  # one line, whole
