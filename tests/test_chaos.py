"""`python -m bench.chaos`: its schedule follows the seed, its checker finds each broken invariant
in a real MLflow store, and (`long`) a short soak on the loopback cluster loses and duplicates
nothing, while the same soak with the lease fencing off is caught duplicating a stage."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from bench.chaos import FAULT_KINDS, check_runs, mlflow_retry_budget_s, schedule, sweep_specs
from sweeps.core.schema import REUSED_FROM_TAG, ROLE_TAG, STAGE_KEY_TAG
from sweeps.core.spec import SweepSpec
from sweeps.run.checks import checked_plan

REPO = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"faults (\d+) confirmed of (\d+) \(kinds (\d+): [^)]*\); stages (\d+); lost (\d+); "
                       r"duplicated (\d+); left running (\d+); time ratio (\S+)")


def test_the_schedule_follows_the_seed_and_draws_every_kind_each_round() -> None:
    import random

    first, again = schedule(random.Random(5), 16, 30.0), schedule(random.Random(5), 16, 30.0)
    assert [(f.scheduled_s, f.kind) for f in first] == [(f.scheduled_s, f.kind) for f in again]
    assert [f.kind for f in schedule(random.Random(6), 16, 30.0)] != [f.kind for f in first]
    assert all(a.scheduled_s <= b.scheduled_s for a, b in zip(first, first[1:]))
    for start in (0, 7):  # each round of seven holds every kind once
        assert Counter(f.kind for f in first[start:start + 7]) == Counter(FAULT_KINDS)
    assert {f.kind for f in schedule(random.Random(5), 5, 30.0, ("trial_pause", "clock_shift"))} == {
        "trial_pause", "clock_shift"}


def test_the_mlflow_gap_past_the_retry_budget_follows_mlflows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib3 sleeps 0 after the first refusal, then factor x 2^(n-1) (at most 120 s) after the n-th.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "4")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "3")
    assert mlflow_retry_budget_s() == 0 + 3 * 2 + 3 * 4 + 3 * 8
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")
    assert mlflow_retry_budget_s() == 0 + 4 + 8 + 16 + 32 + 64 + 120 + 120 + 120


def test_the_checker_finds_each_broken_invariant_in_a_real_store(tmp_path: Path) -> None:
    spec = SweepSpec.model_validate(sweep_specs("check", [0], 3, 2, 1)[0])
    stages = checked_plan(spec, None, None, 2, True, tracking=False, data=False).stages
    by_method = {stage.name.split("/")[1]: stage for stage in stages.values()}  # check-a/<optimiser or pretrain>/...
    pretrain, ste, bmd, bop, bnew = (by_method[name] for name in ("pretrain", "ste", "bmd", "bop", "bnew"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("check", artifact_location=str(tmp_path / "artifacts"))
    (tmp_path / "model.pt").write_text("weights")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "checkpoint.pt").write_text("state")

    def run(stage, steps: list[int], status: str = "FINISHED", artifacts: tuple[str, ...] = ("model.pt", "checkpoint"),
            **tags: str) -> None:
        created = client.create_run(experiment, run_name=stage.name,
                                    tags={ROLE_TAG: "trial", STAGE_KEY_TAG: stage.key, **tags})
        client.log_batch(created.info.run_id, metrics=[Metric("epoch", step, when, step) for when, step in enumerate(steps)],
                         tags=[RunTag("note", "x")])
        for name in artifacts:
            client.log_artifact(created.info.run_id, str(tmp_path / name))
        client.set_terminated(created.info.run_id, status)

    run(pretrain, [0, 1, 2])  # right: one trained run, every epoch once
    run(pretrain, [0, 1, 2], **{REUSED_FROM_TAG: "another run"})  # a link is not a second training
    run(ste, [0, 1])
    run(ste, [0, 1])  # trained twice
    run(bmd, [0, 1, 1])  # epoch 1 logged twice
    run(bop, [0], artifacts=("model.pt",))  # stopped early, and no checkpoint
    run(bnew, [0, 1], status="RUNNING")  # left running, so never finished: lost too
    verdict = check_runs(client, stages, client.search_runs([experiment]))
    assert verdict.stages == 5
    assert verdict.duplicated == [f"{ste.name}: 2 runs"]
    assert verdict.lost == [bnew.name] and verdict.left_running == [bnew.name]
    assert verdict.relogged == [f"{bmd.name} epoch: steps [0, 1, 1]"]
    assert verdict.short == [f"{bop.name} epoch: last step 0 of 2 epochs"]
    assert verdict.missing_artifacts == [f"{bop.name}: has ['model.pt']"]
    assert set(verdict.failures) == {"duplicated", "lost", "left_running", "relogged", "short", "missing_artifacts"}


def soak(history: Path, *options: str, seeds: int = 2, pretrain_epochs: int = 4) -> tuple[int, str]:
    """A short soak, its history written to `history`. The soak keeps its state (stores, logs,
    checkpoints) for a person to read; a test's is removed, with the PostgreSQL and Ray folders it names."""
    done = subprocess.run([sys.executable, "-m", "bench.chaos", "--seeds", str(seeds), "--pretrain-epochs", str(pretrain_epochs),
                           "--epochs", "3", "--no-baseline", "--history", str(history), *options],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    output = done.stdout + done.stderr
    if found := re.search(r"state in (\S+)", output):
        cluster = Path(found.group(1)) / "cluster"
        for named in (cluster / "postgres" / "root", cluster / "ray_tmpdir"):
            if named.exists():
                shutil.rmtree(named.read_text().strip(), ignore_errors=True)
        shutil.rmtree(cluster.parent, ignore_errors=True)
    return done.returncode, output


@pytest.mark.long  # a loopback cluster with PostgreSQL, minutes
@pytest.mark.debian("postgresql")
def test_a_short_soak_loses_nothing_and_the_checker_catches_unfenced_holders(tmp_path: Path) -> None:
    # No outage past MLflow's retry budget: minutes of it would stop both sweeps' drivers while
    # they start, and the faults after it would find no trial to land on (the goal soak has one).
    code, output = soak(tmp_path / "soak.jsonl", "--seed", "4", "--faults", "8", "--mean-gap", "8", "--long-outages", "0")
    last = LAST_LINE.search(output)
    assert last, output[-5000:]
    confirmed, injected, kinds, stages, lost, duplicated, running = map(int, last.groups()[:7])
    assert code == 0 and (lost, duplicated, running) == (0, 0, 0), output[-5000:]
    assert stages == 12 and injected >= 6 and confirmed >= injected - 1 and kinds >= 5, output[-5000:]

    # Fencing off: the paused holder of a pretrained model the other sweep waits for records its
    # run beside the taker's, and the checker says so. One seed: each sweep's pretrain trial has a
    # node of its own from the start, so one of them waits for the other's (with two seeds, sweep
    # `a`'s two pretrain trials could take both nodes and finish before `b` waited for either).
    code, output = soak(tmp_path / "known-bad.jsonl", "--seed", "2", "--faults", "1", "--kinds", "trial_pause",
                        "--known-bad", seeds=1, pretrain_epochs=60)
    last = LAST_LINE.search(output)
    assert last and code == 1, output[-5000:]
    assert int(last.group(1)) == 1 and int(last.group(6)) == 1, output[-5000:]
    history = (tmp_path / "known-bad.jsonl").read_text().splitlines()
    (pause,) = [json.loads(line)["fault"] for line in history if '"fault"' in line]
    assert "which the other sweep waits for" in pause["target"], pause
