"""The CIFAR-10 study preset, CI-sized: a few real JPEGs of three classes (taken from the shared
archive beside the repository), one seed, `--max-epochs 1 --max-batches 2`, through a real local
Ray and a real MLflow store; its report gives a verdict line for every claim of the preset."""

from __future__ import annotations

import runpy
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from sweeps.core.spec import PRESET_DIR
from tests.servers import sweep_env

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = Path("shared/data/cifar10-jpeg.tar.gz")
"""Beside the repository in CI (`../shared`); the worktrees of a checkout find it further up."""
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 3, 10, 4


def shared_archive() -> Path:
    for folder in REPO.parents:
        if (folder / ARCHIVE).is_file():
            return folder / ARCHIVE
    pytest.fail(f"{ARCHIVE} not found beside {REPO} or above it (CI clones it to ../shared)")


def extract_few(archive: Path, root: Path) -> None:
    """The first CLASSES classes of the archive, TRAIN_PER_CLASS/TEST_PER_CLASS images each."""
    wanted: dict[tuple[str, str], int] = {}
    classes: list[str] = []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) != 3:
                continue
            split, label, _ = parts
            if label not in classes:
                if len(classes) == CLASSES:
                    continue
                classes.append(label)
            limit = TRAIN_PER_CLASS if split == "train" else TEST_PER_CLASS
            if wanted.get((split, label), 0) < limit:
                wanted[(split, label)] = wanted.get((split, label), 0) + 1
                tar.extract(member, root, filter="data")
    assert len(wanted) == 2 * CLASSES, f"{archive} lacks train/ or test/ images of {classes}"


def bnew(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.long
def test_ci_sized_study_runs_on_ray_and_reports_every_claim(tmp_path: Path) -> None:
    extract_few(shared_archive(), tmp_path / "data" / "cifar10")
    spec = yaml.safe_load((PRESET_DIR / "cifar10-cpu-study.yaml").read_text())
    spec["name"] = "c10-study-ci"
    spec["axes"]["seed"] = [0]
    spec["datasets"]["imagefolder"]["val_size"] = 6  # of 30 training images
    spec["base"]["batch_size"] = 8
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    env = sweep_env(
        BNEW_PROJECT_DIR=str(tmp_path), BNEW_CACHE_DIR=str(tmp_path / "cache"),
        # Trials read data/cifar10 relative to the project folder, where the driver runs.
        RAY_CHDIR_TO_TRIAL_DIR="0",
    )

    run = bnew("sweep", "run", "study.yaml", "--local", "--max-epochs", "1", "--max-batches", "2", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr and "0 failed" in run.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("c10-study-ci")
    runs = client.search_runs([experiment.experiment_id], "tags.`bnew.role` = 'trial'")
    stages = {run.data.tags["bnew.stage"] for run in runs}
    assert stages == {"teacher", "pretrain", "quantise"} and all(run.info.status == "FINISHED" for run in runs)
    (teacher,) = [run for run in runs if run.data.tags["bnew.stage"] == "teacher"]
    assert 0 <= teacher.data.metrics["final_test_acc_binary"] <= 100  # the teacher's own test accuracy
    quantised = [run for run in runs if run.data.tags["bnew.stage"] == "quantise"]
    assert {run.data.params["data.test_limit"] for run in quantised} == {"1000"}
    assert all("val_acc_binary" in run.data.metrics for run in quantised)

    report = bnew("sweep", "report", "c10-study-ci", "--out", str(tmp_path / "report"), cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    for claim in spec["report"]["claims"]:
        line = next((line for line in text.splitlines() if line.startswith(f"| {claim['name']} |")), None)
        assert line is not None, f"no verdict line for {claim['name']!r}"
        assert "not shown at this scale" in line  # one seed: no test possible
    assert "Selection (report.select: final)" in text and "`c10study/teacher/baseline/seed0`" in text
    assert (tmp_path / "report" / "claims.png").stat().st_size > 0


def test_the_committed_study_recomputes_from_its_per_seed_values(capsys: pytest.CaptureFixture[str]) -> None:
    """studies/cifar10-cpu: every figure of claims.csv recomputed from its per-seed values by
    scipy and statsmodels (recompute.py), and a report that names its tests, boundaries and power."""
    folder = REPO / "studies" / "cifar10-cpu"
    recompute = runpy.run_path(str(folder / "recompute.py"))
    assert recompute["main"](folder / "claims.csv") == 0, capsys.readouterr().out
    assert "every figure agrees with the CSV" in capsys.readouterr().out
    text = (folder / "report.md").read_text()
    claim_lines = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(claim_lines) == 5 and all("paired by seed" in line and "boundary" in line for line in claim_lines)
    assert "MDE at n (80% power)" in text and "Rounds: seeds {start: 3, step: 3, max: 12}" in text
    assert "training images: 5000, a random subset (seed 1)" in text
    claims = pd.read_csv(folder / "claims.csv")
    assert set(claims.correction) == {"sequential, bonferroni"} and (claims.threshold < 0.05 / 5).all()
