"""The sweep service at a scaled-down load, on a real loopback cluster: a Ray head with two Ray
worker nodes and an `mlflow server` on PostgreSQL (cluster/start_local.sh). Sweeps of N and 2N
one-epoch trials each record every trial exactly once, and the MLflow requests a trial costs,
counted in the server's own access log, do not grow with the number of trials (the 300-trial figures: `python -m bench.sweep_load`, bench/RESULTS.md).

A cluster, not `--local`: the lookups under test go through the tracking server, as on a real
cluster, and the server's access log is what counts them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.sweep_load import LoopbackCluster, load_spec, read_records, run_sweep
from sweeps.core.dotted import flatten as flatten_config
from sweeps.core.plan import build_plan
from sweeps.core.spec import parse_spec

N = 8
EPOCHS = 1
ARTIFACTS = 3
"""config.yaml, model.pt and the checkpoint (Tracker.finish_trial)."""


def requests_one_trial_needs(spec: dict) -> int:
    """From what the code does for one trial without inputs: look its stage up at the sweep's
    start (driver) and at the trial's start, create the run, log its params in batches of 100,
    read its logged epochs, log each epoch, log the final metric, fetch the run once for its
    artifact location and upload each artifact, and terminate the run."""
    stage = next(iter(build_plan(parse_spec(spec, "load")).stages.values()))
    param_batches = math.ceil(len(flatten_config(stage.config)) / 100)
    return 2 + 1 + param_batches + 1 + EPOCHS + 1 + 1 + ARTIFACTS + 1


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.debian("postgresql")
def test_every_trial_recorded_once_and_requests_per_trial_do_not_grow(tmp_path: Path) -> None:
    per_trial = {}
    with LoopbackCluster(tmp_path / "cluster", workers=2, backend="postgres") as cluster:
        for trials in (N, 2 * N):
            spec = load_spec(f"load-{trials}", trials, EPOCHS, None, concurrent=2)
            sweep = run_sweep(cluster, spec, tmp_path / str(trials))
            assert sweep.returncode == 0, sweep.output[-3000:]
            assert "ERROR" not in sweep.output and "FileNotFoundError" not in sweep.output, sweep.output[-3000:]
            with cluster.as_client():
                records = read_records(cluster.tracking_uri, spec["name"], EPOCHS)
            assert len(records.runs_per_key) == trials and set(records.runs_per_key.values()) == {1}
            assert records.bad_steps == [] and records.unfinished == []
            per_trial[trials] = sum(sweep.requests.values()) / trials
            # At least what the stage lookups and the run's own records need (the absolute upper
            # bound is to be derived again: lineage and trial logs add requests per trial).
            assert per_trial[trials] >= requests_one_trial_needs(spec), (trials, sweep.requests)
    assert per_trial[2 * N] <= per_trial[N] * 1.05, per_trial
