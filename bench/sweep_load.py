"""`python -m bench.sweep_load`: the sweep service under load, on a real loopback cluster.

Starts its own cluster (`cluster/start_local.sh`: a Ray head, `--workers` Ray worker nodes, an
`mlflow server` on PostgreSQL), runs sweeps of N short real-valued trials on synthetic data (one
stage per trial, no prerequisites: the service's cost per trial is what is measured), checks that
every trial is recorded exactly once, stops the cluster and prints, per sweep size:

- wall time of `bnew sweep run`;
- the overhead per trial, median and p95: the trial's MLflow run time (created in the trial,
  terminated after its artifacts are logged) minus the trainer's own time for the same config
  (`train()` timed in this process, median of 3), and the slot time per trial (wall time x
  slots / trials) minus the same trainer time, which adds Tune's scheduling and actor start;
  also the median of each Ray node's first trial (a new actor's: it pays the process's first use
  of torch and MLflow inside its run) and the p95 of the others;
- the driver's peak memory (VmHWM of the `bnew` process);
- MLflow requests per trial, counted server-side from the server's access log (uvicorn logs
  every request to the server's stdout, which start_local.sh keeps in mlflow.log).

`--checkpoint-trials/--checkpoint-epochs` add two sweeps of multi-epoch trials, one
checkpointing every epoch and one with the spec's default interval, to measure what a
checkpoint costs. `--code DIR` runs another checkout's `sweeps` (e.g. an older commit in a
`git worktree`) on the same cluster set-up, to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_ATTEMPTS = 3
REQUEST_LINE = re.compile(r'"(GET|POST|PUT|DELETE|PATCH) (/[^ ?"]*)')
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts/"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LoopbackCluster:
    """`cluster/start_local.sh` in `state` with free ports; `env` is what a driver needs."""

    def __init__(self, state: Path, workers: int, backend: str, code: Path = REPO,
                 node_env: dict[str, str] | None = None) -> None:
        """`node_env`: more variables for every node (and so every trial and job driver)."""
        self.state, self.code = state, code
        self.base_env = {
            **os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(code),
            "WORKERS": str(workers), "CPUS_PER_NODE": "1", "MLFLOW_BACKEND": backend,
            "RAY_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port()),
            "DASHBOARD_PORT": str(free_port()), "RAY_CLIENT_PORT": str(free_port()),
            # MLflow 3's GenAI job runners (~1 GB), which no sweep uses.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
            **(node_env or {}),
        }
        self.env: dict[str, str] = {}

    def __enter__(self) -> "LoopbackCluster":
        for attempt in range(1, START_ATTEMPTS + 1):
            # On a crowded machine a raylet can miss Ray's fixed 30 s registration window.
            started = subprocess.run(["bash", str(REPO / "cluster" / "start_local.sh"), str(self.state)],
                                     env=self.base_env, capture_output=True, text=True, timeout=600)
            if started.returncode == 0:
                break
            self.__exit__()
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"cluster did not start: {started.stderr[-2000:]}")
        exports = [line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines()
                   if line.startswith("export ")]
        self.env = {**self.base_env, **dict(exports)}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        subprocess.run(["bash", str(REPO / "cluster" / "stop_local.sh"), str(self.state)],
                       env=self.base_env, capture_output=True, timeout=300)

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def as_client(self) -> contextlib.AbstractContextManager:
        """This process's environment with the MLflow URI and any credentials the cluster printed."""
        return mock.patch.dict(os.environ, {k: v for k, v in self.env.items() if k.startswith("MLFLOW_TRACKING_")})

    @property
    def access_log(self) -> Path:
        return self.state / "mlflow.log"


def load_spec(name: str, trials: int, epochs: int, every_epochs: int | None, concurrent: int) -> dict[str, Any]:
    """N real-valued trials on synthetic data, a few batches each, one stage per trial, `concurrent`
    at once whatever the code's own default (the commit before the leases ran such a search one
    trial at a time on this cluster: one actor, whose first trial alone pays a new process's
    first use of torch and MLflow)."""
    spec: dict[str, Any] = {
        "name": name,
        "axes": {"dataset": ["synthetic"], "optimiser": ["real"], "seed": [0], "budget": [epochs],
                 # Draws seeded by the sweep's name: no sweep of a run reuses another's stages.
                 "params": {"lr": {"loguniform": [1e-4, 1e-1], "samples": trials, "seed": zlib.crc32(name.encode())}}},
        "base": {"batch_size": 32, "device": "cpu", "max_batches": 3, "eval_batch_size": 256,
                 "data": {"synthetic_size": 128}},
        "resources": {"cpu": 1},
        "max_failures": 1,
        "max_concurrent": concurrent,
    }
    if every_epochs is not None:
        spec["checkpoint"] = {"every_epochs": every_epochs}
    return spec


def trainer_seconds(spec: dict[str, Any], repeats: int = 3) -> float:
    """Median time of the trainer alone (`train()`, no callbacks) on the spec's first stage, on
    one thread: Ray runs a 1-CPU trial with OMP_NUM_THREADS=1."""
    import torch

    from bnew_core.train import train
    from sweeps.core.plan import build_plan
    from sweeps.core.spec import parse_spec

    stage = next(iter(build_plan(parse_spec(spec, "load")).stages.values()))
    threads = torch.get_num_threads()
    torch.set_num_threads(int(spec["resources"]["cpu"]))
    times = []
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(repeats):
            started = time.perf_counter()
            train(stage.trial_config(Path(directory), {}))
            times.append(time.perf_counter() - started)
    torch.set_num_threads(threads)
    return statistics.median(times)


@dataclass
class SweepRun:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    output: str
    requests: Counter


def count_requests(log: Path, start: int, end: int) -> Counter:
    """Requests per endpoint in the server's access log between two byte offsets."""
    with open(log, "rb") as handle:
        handle.seek(start)
        text = handle.read(end - start).decode(errors="replace")
    return Counter(f"{m.group(1)} {endpoint(m.group(2))}" for m in REQUEST_LINE.finditer(text))


def endpoint(path: str) -> str:
    """The request's endpoint: ids and artifact paths left out."""
    if path.startswith(ARTIFACTS):
        return f"{ARTIFACTS}<experiment>/{'<model>/' if '/models/' in path else '<run>/'}...{path.rpartition('/')[2]}"
    return re.sub(r"m-[0-9a-f]{32}", "<model>", path)


def run_sweep(cluster: LoopbackCluster, spec: dict[str, Any], work: Path) -> SweepRun:
    """`bnew sweep run` on the cluster, with its wall time, peak RSS and MLflow requests."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / f"{spec['name']}.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = {**cluster.env, "BNEW_PROJECT_DIR": str(work), "BNEW_STORAGE_PATH": str(work / "storage")}
    log_start = cluster.access_log.stat().st_size
    started = time.perf_counter()
    with open(work / "sweep.log", "w+") as output:
        process = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "sweep", "run", str(spec_path)],
                                   cwd=work, env=env, stdout=output, stderr=subprocess.STDOUT)
        peak_kb = 0
        while process.poll() is None:
            peak_kb = max(peak_kb, vm_hwm_kb(process.pid))
            time.sleep(0.5)
        wall = time.perf_counter() - started
        output.seek(0)
        text = output.read()
    time.sleep(1)  # the server's last access-log lines
    requests = count_requests(cluster.access_log, log_start, cluster.access_log.stat().st_size)
    return SweepRun(wall, peak_kb / 1024, process.returncode, text, requests)


def vm_hwm_kb(pid: int) -> int:
    """Peak resident memory of a live process (0 once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) if match else 0


@dataclass
class Records:
    runs_per_key: Counter
    """Stage key -> trial runs of this sweep (1 each when recorded exactly once)."""
    bad_steps: list[str]
    """Runs whose `loss` history is not each epoch exactly once."""
    unfinished: list[str]
    run_seconds: list[float]
    """MLflow run time of each trial (end - start)."""
    first_on_node: list[bool]
    """Per `run_seconds`: whether the run is its Ray node's first, trained by a new actor (Tune
    reuses an actor for the node's next trials)."""


def read_records(tracking_uri: str, sweep: str, epochs: int) -> Records:
    from mlflow import MlflowClient

    from sweeps.records.tracker import Tracker

    tracker = Tracker(tracking_uri)
    client: MlflowClient = tracker.client
    runs = tracker.trial_runs(tracker.experiment_id(sweep, create=False))
    bad_steps = []
    for run in runs:
        steps = sorted(metric.step for metric in client.get_metric_history(run.info.run_id, "loss"))
        if steps != list(range(epochs)):
            bad_steps.append(f"{run.info.run_name}: {steps}")
    ended = sorted((run for run in runs if run.info.end_time), key=lambda run: run.info.start_time)
    nodes = [run.data.tags.get("bnew.node") for run in ended]
    return Records(
        runs_per_key=Counter(run.data.tags["bnew.stage_key"] for run in runs),
        bad_steps=bad_steps,
        unfinished=[run.info.run_name for run in runs if run.info.status != "FINISHED"],
        run_seconds=[(run.info.end_time - run.info.start_time) / 1000 for run in ended],
        first_on_node=[node not in nodes[:index] for index, node in enumerate(nodes)],
    )


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(cluster: LoopbackCluster, work: Path, label: str, trials: int, epochs: int,
            every_epochs: int | None, slots: int) -> dict[str, Any]:
    """One sweep, checked and summarised as one column of the table."""
    spec = load_spec(f"load-{label}", trials, epochs, every_epochs, slots)
    trainer = trainer_seconds(spec)
    sweep = run_sweep(cluster, spec, work / label)
    if sweep.returncode != 0:
        raise RuntimeError(f"{label}: bnew sweep run exited {sweep.returncode}:\n{sweep.output[-3000:]}")
    with cluster.as_client():
        records = read_records(cluster.tracking_uri, spec["name"], epochs)
    reused = re.search(r"(\d+) stages reused", sweep.output)
    if reused is None:
        raise RuntimeError(f"{label}: the sweep did not say how many stages it reused:\n{sweep.output[-2000:]}")
    if int(reused.group(1)):  # reused stages would cost nothing and skew every row
        raise RuntimeError(f"{label}: {reused.group(0)} from an earlier sweep")
    problems = [f"{len(records.runs_per_key)} stage keys recorded, {trials} planned"] if len(records.runs_per_key) != trials else []
    problems += [f"stage {key}: {count} runs" for key, count in records.runs_per_key.items() if count != 1]
    problems += records.bad_steps + [f"{name}: not FINISHED" for name in records.unfinished]
    if problems:
        raise RuntimeError(f"{label}: not recorded exactly once: {problems[:10]}")
    overhead = [seconds - trainer for seconds in records.run_seconds]
    first = [value for value, is_first in zip(overhead, records.first_on_node) if is_first]
    later = [value for value, is_first in zip(overhead, records.first_on_node) if not is_first]
    total = sum(sweep.requests.values())
    return {
        "label": label, "trials": trials, "epochs": epochs, "wall_s": sweep.wall_s, "trainer_s": trainer,
        "overhead_median_s": statistics.median(overhead), "overhead_p95_s": percentile(overhead, 0.95),
        "first_on_node_overhead_s": statistics.median(first),
        "later_overhead_p95_s": percentile(later, 0.95) if later else float("nan"),
        "slot_overhead_s": sweep.wall_s * slots / trials - trainer, "driver_peak_mb": sweep.peak_rss_mb,
        "requests": total, "requests_per_trial": total / trials, "by_endpoint": sweep.requests,
    }


ROWS = [
    ("trials", "{:d}"), ("epochs", "{:d}"), ("wall_s", "{:.0f}"), ("trainer_s", "{:.2f}"),
    ("overhead_median_s", "{:.2f}"), ("overhead_p95_s", "{:.2f}"), ("first_on_node_overhead_s", "{:.2f}"),
    ("later_overhead_p95_s", "{:.2f}"), ("slot_overhead_s", "{:.2f}"),
    ("driver_peak_mb", "{:.0f}"), ("requests", "{:d}"), ("requests_per_trial", "{:.1f}"),
]


def table(columns: list[dict[str, Any]]) -> str:
    header = "| |" + "|".join(f" {c['label']} " for c in columns) + "|"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for key, fmt in ROWS:
        lines.append(f"| {key} |" + "|".join(f" {fmt.format(c[key])} " for c in columns) + "|")
    return "\n".join(lines)


def endpoint_table(columns: list[dict[str, Any]]) -> str:
    endpoints = sorted({e for c in columns for e in c["by_endpoint"]})
    lines = ["| requests per trial |" + "|".join(f" {c['label']} " for c in columns) + "|",
             "|---" * (len(columns) + 1) + "|"]
    for endpoint in endpoints:
        lines.append(f"| `{endpoint}` |" + "|".join(f" {c['by_endpoint'][endpoint] / c['trials']:.2f} " for c in columns) + "|")
    return "\n".join(lines)


def positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be a positive integer")
    return value


def sizes(text: str) -> list[int]:
    return [positive(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_load", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=sizes, default=[30, 300], help="sweep sizes, comma-separated (30,300)")
    parser.add_argument("--workers", type=positive, default=2, help="Ray worker nodes (1 CPU each)")
    parser.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres", help="MLflow's metadata store")
    parser.add_argument("--checkpoint-trials", type=int, default=0, help="trials of the checkpoint comparison (0: skip)")
    parser.add_argument("--checkpoint-epochs", type=positive, default=6, help="epochs per trial in the checkpoint comparison")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose sweeps/ and bnew_core/ run (default this one)")
    args = parser.parse_args(argv)
    code = args.code.resolve()
    if not (code / "sweeps" / "__init__.py").is_file():
        parser.error(f"--code: {code} has no sweeps/ package")
    sys.path.insert(0, str(code))
    state = Path(tempfile.mkdtemp(prefix="bnew-load-"))
    columns = []
    with LoopbackCluster(state / "cluster", args.workers, args.backend, code) as cluster:
        print(f"cluster: {args.workers} workers, MLflow on {args.backend} at {cluster.tracking_uri}; state in {state}", flush=True)
        for trials in args.trials:
            columns.append(measure(cluster, state, f"{trials}x1", trials, 1, None, args.workers))
            print(f"{trials} trials: {columns[-1]['wall_s']:.0f} s", flush=True)
        if args.checkpoint_trials:
            for label, every in (("ckpt-every-epoch", 1), ("ckpt-default", None)):
                columns.append(measure(cluster, state, label, args.checkpoint_trials, args.checkpoint_epochs,
                                       every, args.workers))
                print(f"{label}: {columns[-1]['wall_s']:.0f} s", flush=True)
    print(table(columns))
    print()
    print(endpoint_table(columns))


if __name__ == "__main__":
    main()
