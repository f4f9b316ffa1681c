"""`python -m bench.chaos --seed S --faults K`: compound faults on a real loopback cluster, then a
checker that reads MLflow and Ray and says whether anything was lost, done twice or left running.

The cluster is `cluster/start_local.sh`'s (a Ray head with the Jobs API, `--workers` worker nodes
of 1 CPU, an `mlflow server` with basic auth on PostgreSQL). Two digits sweeps are submitted as
Ray jobs at the same moment: `a` (every optimiser x `--seeds` seeds: a pretrained model per seed
and four quantise stages on it) and `b` (BNEW with another lambda_rate on the same pretrained
models, so the two sweeps share them through the stage leases). Trials run several epochs and
checkpoint each. While they run, K faults are injected at times and of kinds drawn from the seed
(the schedule goes to the history file first), each confirmed as it lands:

- `trial_kill`: a trial's worker process SIGKILLed (confirmed: its pid gone; the next trial pid);
- `node_restart`: a worker node's raylet and its processes SIGKILLed, the node started again
  (confirmed: Ray marks the node dead, a new node joins);
- `driver_resubmit`: a sweep's job driver SIGKILLed, the sweep submitted again with `--resume`
  (confirmed: the job FAILED, the new job's id);
- `mlflow_restart`: the MLflow server SIGKILLed and started again, the soak's first time after a
  gap past its clients' retry budget, later ones after seconds to a minute (confirmed: a refused
  connection);
- `postgres_restart`: PostgreSQL stopped in immediate mode (a crash) and started again
  (confirmed: a refused connection, then its start);
- `trial_pause`: a trial's process SIGSTOPped past the lease timeout, then continued, preferring
  the holder of a stage the other sweep waits for (confirmed: the process state `T`);
- `clock_shift`: a worker node restarted with its wall clock off by minutes to an hour
  (`bench/chaos_clock`; confirmed: a task on the new node reads the shifted clock).

Each fault's history line says when it landed: during a resume (within a minute of a
resubmission or of a node's restart), or else mid-epoch of a trial (trial faults) or mid-sweep.
After both sweeps' last jobs end, the checker asserts: every stage key has exactly one FINISHED
run that trained it; every (run, epoch metric, step) is logged once and each trained run's last
step is its stage's last epoch; no run is left RUNNING; both sweeps' last jobs SUCCEEDED; every
trained run has its model and checkpoint artifacts; and, unless `--no-baseline` (then the same
sweeps, with other training seeds so that nothing is reused, first run without faults), that the
faulted run took at most 1.5 times as long. Last
line: `faults K confirmed of N (kinds ...); stages S; lost L; duplicated D; left running R; time
ratio T`, after a line per fault as it lands and, every two minutes, how many stages are done;
the exit status is 1 if any invariant fails. `--known-bad` turns the lease fencing off
on the nodes (`BNEW_SWEEP_UNFENCED`), so a paused holder records its run beside the taker's: the
checker must then fail.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import yaml
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from urllib3.exceptions import MaxRetryError, ProtocolError
from urllib3.util.retry import Retry

from bench.sweep_load import BIN, REPO, LoopbackCluster
from bnew_core.callbacks import EPOCH_METRICS
from sweeps.core.plan import Stage
from sweeps.core.schema import RESUMED_FROM_TAG, REUSED_FROM_TAG, ROLE_TAG, STAGE_KEY_TAG
from sweeps.core.spec import load_spec
from sweeps.records.tracker import Tracker
from sweeps.run.checks import checked_plan
from sweeps.run.jobs import job_client, submit_sweep
from sweeps.run.trial import NODE_TAG, WAITING_FOR_TAG
from tests.servers import descendants, process_table

FAULT_KINDS = ("trial_kill", "node_restart", "driver_resubmit", "mlflow_restart", "postgres_restart",
               "trial_pause", "clock_shift")
LEASE_TIMEOUT_S = 30
LEASE_ENV = {"BNEW_LEASE_HEARTBEAT_S": "2", "BNEW_LEASE_TIMEOUT_S": str(LEASE_TIMEOUT_S), "BNEW_LEASE_POLL_S": "2"}
"""Short lease timings on every node, so a pause outlasts a lease in seconds, not minutes; not so
short that an MLflow or PostgreSQL restart of seconds (with the server's own start) outlasts it."""
PAUSE_S = LEASE_TIMEOUT_S + 15
CLOCK_SHIFTS_S = (-3600, -600, 600, 3600)
RESUME_WINDOW_S = 60
"""A fault within this long of a resubmission or a node's restart lands during a resume."""
CONFIRM_TIMEOUT_S = 180
TRIAL_TITLE = "ray::ImplicitFunc.train"
"""Ray's process title of a function trainable while it trains."""
CLOCK_DIR = Path(__file__).resolve().parent / "chaos_clock"
MAX_TIME_RATIO = 1.5
PROGRESS_S = 120
"""How often the soak says how many stages are done."""


def mlflow_retry_budget_s() -> float:
    """How long an MLflow client retries a refused request before it fails: the sleeps urllib3's
    `Retry` takes between MLflow's attempts (MLFLOW_HTTP_REQUEST_MAX_RETRIES and _BACKOFF_FACTOR,
    its defaults or as set; jitter left out)."""
    retry = Retry(total=MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), backoff_factor=MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get())
    budget = 0.0
    while True:
        try:
            retry = retry.increment(method="GET", url="/", error=ProtocolError("connection refused"))
        except MaxRetryError:
            return budget
        budget += retry.get_backoff_time()


@dataclass
class Fault:
    """One scheduled fault and, once injected, how it landed."""

    kind: str
    scheduled_s: float
    at_s: float | None = None
    target: str = ""
    confirmed: str = ""
    """How it was seen to land; empty: it was not."""
    phase: str = ""
    note: str = ""


def schedule(rng: random.Random, faults: int, mean_gap_s: float, kinds_drawn: tuple[str, ...] = FAULT_KINDS) -> list[Fault]:
    """`faults` faults at exponential gaps; every kind once per round, in an order drawn from `rng`."""
    kinds: list[str] = []
    while len(kinds) < faults:
        kinds += rng.sample(kinds_drawn, len(kinds_drawn))
    at, planned = 0.0, []
    for kind in kinds[:faults]:
        at += rng.expovariate(1 / mean_gap_s)
        planned.append(Fault(kind, round(at, 1)))
    return planned


def sweep_specs(prefix: str, seeds: list[int], pretrain_epochs: int, budget: int, max_failures: int) -> list[dict]:
    """Sweep `a` (every optimiser on each seed's pretrained model) and sweep `b` (BNEW with another
    lambda_rate on the same pretrained models)."""
    def spec(name: str, methods: list[str], **extra: Any) -> dict:
        return {"name": f"{prefix}-{name}",
                "axes": {"dataset": ["digits"], "optimiser": methods, "seed": seeds, "budget": [budget]},
                "base": {"batch_size": 64, "device": "cpu"}, "phases": {"pretrain": {"epochs": pretrain_epochs}},
                "checkpoint": {"every_epochs": 1}, "max_failures": max_failures, "resources": {"cpu": 1}, **extra}

    return [spec("a", ["ste", "bmd", "bop", "bnew"]), spec("b", ["bnew"], optimisers={"bnew": {"lambda_rate": 5.0}})]


# --- processes and nodes ------------------------------------------------------------------------------
def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it."""
    for victim in [pid, *descendants(pid, process_table())]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    return False


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def wait_until(condition: Callable[[], Any], timeout: float = CONFIRM_TIMEOUT_S, every: float = 0.5) -> Any:
    """`condition()`'s first truthy value, or None after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    return None


class Soak:
    """The cluster, the two sweeps' jobs, and the faults injected into them."""

    def __init__(self, state: Path, max_batches: int, history: Path, rng: random.Random, long_outages: int = 1):
        """`state`: the cluster's folder; this process's environment is the cluster's (its
        addresses, Ray's token, MLflow's credentials), as `eval "$(cluster/start_local.sh)"` gives."""
        self.state, self.max_batches, self.history, self.rng = state, max_batches, history, rng
        self.long_outages = long_outages
        """How many more MLflow restarts keep the server down past its clients' retry budget."""
        self.env = dict(os.environ)
        self.tracking_uri = self.env["MLFLOW_TRACKING_URI"]
        ray.init(address=self.env["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
        self.client = MlflowClient()
        self.jobs_client = job_client(self.env["RAY_API_SERVER_ADDRESS"])
        self.ray_tmpdir = (state / "ray_tmpdir").read_text().strip()
        self.started = time.monotonic()
        self.jobs: dict[str, str] = {}
        """Sweep name -> its latest job."""
        self.killed_jobs: set[str] = set()
        self.unexpected: list[str] = []
        self.resumed_at: list[float] = []
        self.targeted: set[int] = set()
        """Trial processes a fault has taken: each trial fault lands on one of its own."""
        self.lock = threading.Lock()
        self.node_lock = threading.Lock()  # one node fault at a time: each waits for Ray to see the node dead
        # One restart of a server at a time: a second one waits for the first's server to be back.
        self.mlflow_lock, self.postgres_lock = threading.Lock(), threading.Lock()

    def now(self) -> float:
        return round(time.monotonic() - self.started, 1)

    # --- the sweeps ------------------------------------------------------------------------------
    def submit(self, spec_path: Path, resume: bool = False) -> str:
        spec = load_spec(str(spec_path))
        job = submit_sweep(self.jobs_client, spec, self.tracking_uri, "resume" if resume else "run", None,
                           self.max_batches, True, None, False)
        with self.lock:
            self.jobs[spec.name] = job
            if resume:
                self.resumed_at.append(time.monotonic())
        return job

    def status(self, job: str) -> str:
        return str(self.jobs_client.get_job_status(job))

    def running(self) -> bool:
        return any(self.status(job) not in ("SUCCEEDED", "FAILED", "STOPPED") for job in list(self.jobs.values()))

    def watch(self, specs: dict[str, Path]) -> None:
        """Resubmit (`--resume`) a sweep whose job ended otherwise than SUCCEEDED and was not
        killed by a fault (a fault resubmits its own): noted as unexpected."""
        for name, job in list(self.jobs.items()):
            status = self.status(job)
            if status in ("FAILED", "STOPPED") and job not in self.killed_jobs:
                self.unexpected.append(f"{job} {status}: {self.jobs_client.get_job_info(job).message}")
                self.killed_jobs.add(job)
                self.submit(specs[name], resume=True)

    # --- what the faults target ------------------------------------------------------------------
    def worker_nodes(self) -> list[dict]:
        """Ray's live worker nodes, each with its raylet's pid (`pid`)."""
        table = process_table()
        nodes = []
        for node in ray.nodes():
            if not node["Alive"] or "node:__internal_head__" in node["Resources"]:
                continue
            raylet = next((pid for pid, (_, args) in table.items() if args.split(" ", 1)[0].endswith("/raylet")
                           and node["RayletSocketName"] in args), None)
            if raylet is not None:
                nodes.append({**node, "pid": raylet})
        return nodes

    def trials(self, node: dict | None = None) -> list[tuple[int, str]]:
        """The trial processes training now, on `node` or on every worker node: (pid, Ray node id)."""
        table = process_table()
        return [(pid, each["NodeID"]) for each in ([node] if node else self.worker_nodes())
                for pid in descendants(each["pid"], table) if table[pid][1].startswith(TRIAL_TITLE)]

    def say_progress(self, label: str, elapsed: float) -> None:
        """How many stages have a FINISHED trial run so far ('?' while MLflow is away)."""
        try:
            runs = self.client.search_runs(self.experiment_ids(), f"attributes.status = 'FINISHED' and "
                                           f"tags.`{ROLE_TAG}` = 'trial'", max_results=5000)
            finished = str(len({run.data.tags.get(STAGE_KEY_TAG) for run in runs}))
        except MlflowException:
            finished = "?"
        print(f"[{elapsed:7.1f} s] {label}: {finished} stages finished", flush=True)

    def untargeted_trials(self) -> list[tuple[int, str]]:
        return [trial for trial in self.trials() if trial[0] not in self.targeted]

    def target(self, trials: list[tuple[int, str]]) -> tuple[int, str] | None:
        """One of `trials` that no other fault has taken, now taken (None if another fault took
        them all meanwhile): two faults drawn close together, one of them slowed by an outage,
        could otherwise both count one kill."""
        with self.lock:
            free = [trial for trial in trials if trial[0] not in self.targeted]
            if not free:
                return None
            trial = self.rng.choice(free)
            self.targeted.add(trial[0])
            return trial

    def pick_trial(self, fault: Fault) -> tuple[int, str] | None:
        """A training trial that no other fault has taken, now taken by `fault`; None (noted on
        `fault`) if none trained within 120 s."""
        while True:
            trials = wait_until(self.untargeted_trials, timeout=120)
            if not trials:
                fault.note = "no trial trained within 120 s"
                return None
            if (picked := self.target(trials)) is not None:
                return picked

    def experiment_ids(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments() if e.name in self.jobs]

    def waited_holder(self) -> tuple[tuple[int, str], str] | None:
        """A trial process holding a stage that the other sweep waits for, and the stage's key
        (None while there is none, or while another fault keeps MLflow away)."""
        try:
            waiting = self.client.search_runs(self.experiment_ids(),
                                              f"attributes.status = 'RUNNING' and tags.`{WAITING_FOR_TAG}` != ''")
            holders = [self.client.get_run(waiter.data.tags[WAITING_FOR_TAG]) for waiter in waiting]
        except MlflowException:
            return None
        for holder in holders:
            node_id = holder.data.tags.get(NODE_TAG, "").rsplit("/", 1)[-1]
            if holder.info.status != "RUNNING" or not node_id:
                continue
            for node in self.worker_nodes():
                if node["NodeID"].startswith(node_id) and (trials := self.trials(node)):
                    return trials[0], holder.data.tags.get(STAGE_KEY_TAG, "?")
        return None

    def phase(self, node_id: str | None = None) -> str:
        """When a fault lands: during a resume (a trial on `node_id` that has logged no epoch since
        it continued from a checkpoint, or within a minute of a resubmission or a node's restart),
        else mid-epoch of the trial training on `node_id` (which epoch), or mid-sweep."""
        run = None
        if node_id is not None:
            runs = self.client.search_runs(self.experiment_ids(), "attributes.status = 'RUNNING' and "
                                           f"tags.`{NODE_TAG}` LIKE '%/{node_id[:12]}'")
            run = next((run for run in runs if REUSED_FROM_TAG not in run.data.tags), None)
        logged = int(run.data.metrics.get("epoch", -1)) if run else -1
        resumed = run.data.tags.get(RESUMED_FROM_TAG) if run else None
        if resumed is not None and logged < int(resumed):
            return f"during a resume: {run.info.run_name} continued from epoch {resumed}, none logged since"
        if any(time.monotonic() - at < RESUME_WINDOW_S for at in self.resumed_at):
            return f"during a resume: within {RESUME_WINDOW_S} s of a resubmission or a node's restart"
        return f"mid-epoch: {run.info.run_name}, in epoch {logged + 1}" if run else "mid-sweep"

    # --- the faults ------------------------------------------------------------------------------
    def inject(self, fault: Fault, specs: dict[str, Path]) -> None:
        fault.at_s = self.now()
        try:
            getattr(self, fault.kind)(fault, specs)
        except Exception as exc:  # a fault that could not be injected is a line of the history, not the end of the soak
            fault.note = f"{type(exc).__name__}: {exc}"[:300]
        with self.lock, open(self.history, "a") as history:
            history.write(json.dumps({"fault": asdict(fault)}) + "\n")
        print(f"[{fault.at_s:7.1f} s] {fault.kind:16} {'confirmed: ' + fault.confirmed if fault.confirmed else 'NOT confirmed'}"
              f"{' (' + fault.note + ')' if fault.note else ''}", flush=True)

    def trial_kill(self, fault: Fault, specs: dict[str, Path]) -> None:
        victim = None
        while victim is None:  # a trial that ended (or whose node another fault killed) meanwhile: the next one
            if (picked := self.pick_trial(fault)) is None:
                return
            victim, node_id = picked
            fault.target, fault.phase = f"trial pid {victim}", self.phase(node_id)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                victim = None
        if wait_until(lambda: not alive(victim), timeout=30):
            after = wait_until(lambda: [pid for pid, _ in self.trials() if pid != victim], timeout=120)
            fault.confirmed = f"pid {victim} gone" + (f"; trial pid {after[0]} trains next" if after else "")

    def restart_node(self, fault: Fault, shift_s: float) -> None:
        """A worker node's raylet and its processes SIGKILLed; once Ray marks it dead, a node started
        again (its Python clock off by `shift_s`)."""
        with self.node_lock:
            nodes = self.worker_nodes()
            busy = [node for node in nodes if self.trials(node)]
            node = self.rng.choice(busy or nodes)
            fault.target = f"node {node['NodeID'][:12]} (raylet pid {node['pid']})"
            fault.phase = self.phase(node["NodeID"] if busy else None)
            kill_tree(node["pid"])
            dead = wait_until(lambda: not any(n["NodeID"] == node["NodeID"] and n["Alive"] for n in ray.nodes()))
            if not dead:
                fault.note = "Ray did not mark the node dead"
            env = {**self.env, "RAY_TMPDIR": self.ray_tmpdir}
            env.pop("RAY_ADDRESS", None)
            if shift_s:
                env.update(BNEW_CHAOS_CLOCK_SHIFT_S=str(shift_s), PYTHONPATH=f"{CLOCK_DIR}:{env.get('PYTHONPATH', '')}")
            before = {n["NodeID"] for n in ray.nodes()}
            started = subprocess.run(
                [str(BIN / "ray"), "start", "--address", self.env["RAY_ADDRESS"], "--node-ip-address", "127.0.0.1",
                 "--num-cpus", "1", "--dashboard-agent-listen-port", "0", "--disable-usage-stats"],
                env=env, capture_output=True, text=True, timeout=300)
            joined = wait_until(lambda: [n for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before])
            self.resumed_at.append(time.monotonic())
            if started.returncode != 0 or not joined:
                fault.note = f"node did not start again: {started.stderr[-300:]}"
                return
            fault.confirmed = f"node marked dead by Ray; node {joined[0]['NodeID'][:12]} joined"
            if shift_s:
                clock = self.node_clock(joined[0]["NodeID"])
                fault.confirmed += f"; a task there reads the clock {clock - time.time():+.0f} s off"
                if abs(clock - time.time() - shift_s) > 60:
                    fault.confirmed = ""
                    fault.note = f"the node's clock reads {clock - time.time():+.0f} s off, not {shift_s:+.0f} s"

    def node_clock(self, node_id: str) -> float:
        @ray.remote(num_cpus=0)
        def wall_clock() -> float:
            return time.time()

        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return ray.get(wall_clock.options(scheduling_strategy=strategy).remote(), timeout=CONFIRM_TIMEOUT_S)

    def node_restart(self, fault: Fault, specs: dict[str, Path]) -> None:
        self.restart_node(fault, 0)

    def clock_shift(self, fault: Fault, specs: dict[str, Path]) -> None:
        self.restart_node(fault, self.rng.choice(CLOCK_SHIFTS_S))

    def driver_resubmit(self, fault: Fault, specs: dict[str, Path]) -> None:
        running = wait_until(lambda: [(name, job) for name, job in self.jobs.items() if self.status(job) == "RUNNING"])
        info = None
        if running:
            name, job = self.rng.choice(running)
            info = wait_until(lambda: (self.jobs_client.get_job_info(job).driver_info or None), timeout=60)
        if not info:
            fault.note = "no sweep's driver was running"
            return
        fault.target, fault.phase = f"job {job} (driver pid {info.pid})", self.phase()
        self.killed_jobs.add(job)
        kill_tree(int(info.pid))
        ended = wait_until(lambda: self.status(job) in ("FAILED", "STOPPED") and self.status(job))
        resubmitted = self.submit(specs[name], resume=True)
        if ended:
            fault.confirmed = f"job {ended}; submitted again with --resume as {resubmitted}"

    def mlflow_restart(self, fault: Fault, specs: dict[str, Path]) -> None:
        with self.mlflow_lock:
            self.restart_mlflow(fault)

    def restart_mlflow(self, fault: Fault) -> None:
        pid_file = self.state / "mlflow.pid"
        pid = int(pid_file.read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
        port = int(self.tracking_uri.rsplit(":", 1)[1])
        budget = mlflow_retry_budget_s()
        # One outage past the clients' retries shows that trials come back from it; each such
        # outage halts every trial's logging and lease for minutes, so one per soak by default.
        if self.long_outages > 0:
            gap, self.long_outages = budget + self.rng.uniform(10, 30), self.long_outages - 1
        else:
            gap = self.rng.choice([self.rng.uniform(2, 10), self.rng.uniform(10, 60)])
        fault.target, fault.phase = f"mlflow server pid {pid}, down {gap:.0f} s (clients retry {budget:.0f} s)", self.phase()
        kill_tree(pid)
        seen_refused = wait_until(lambda: refused(port), timeout=30)
        time.sleep(gap)
        with open(self.state / "mlflow.log", "a") as log:
            server = subprocess.Popen([arg.decode() for arg in argv], env={k.decode(): v.decode() for k, v in environ.items()},
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        pid_file.write_text(f"{server.pid}\n")
        back = wait_until(lambda: self.healthy(), timeout=300, every=1)
        if seen_refused and back:
            fault.confirmed = f"connection refused on :{port}; server pid {server.pid} back after {gap:.0f} s"

    def healthy(self) -> bool:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=5)
            return True
        return False

    def postgres_restart(self, fault: Fault, specs: dict[str, Path]) -> None:
        with self.postgres_lock:
            self.restart_postgres(fault)

    def restart_postgres(self, fault: Fault) -> None:
        folder = self.state / "postgres"
        root = (folder / "root").read_text().strip()
        pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
        port = int(self.env["PG_PORT"])
        gap = self.rng.uniform(1, 20)
        fault.target, fault.phase = f"postgresql on :{port}, down {gap:.0f} s", self.phase()
        subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", f"{pg_bin}/pg_ctl -D {root}/data -m immediate stop"],
                       capture_output=True, cwd="/", timeout=120)
        seen_refused = wait_until(lambda: refused(port), timeout=30)
        time.sleep(gap)
        started = subprocess.run(["bash", str(REPO / "cluster" / "postgres_local.sh"), str(folder)],
                                 env={**os.environ, "PG_PORT": str(port)}, capture_output=True, text=True, timeout=300)
        if started.returncode != 0:
            fault.note = f"postgresql did not start again: {started.stderr[-300:]}"
        elif seen_refused:
            fault.confirmed = f"connection refused on :{port}; started again after {gap:.0f} s (crash recovery)"

    def trial_pause(self, fault: Fault, specs: dict[str, Path]) -> None:
        held = wait_until(self.waited_holder, timeout=60, every=2)
        if held and self.target([held[0]]):
            (victim, node_id), key = held
            fault.target = f"trial pid {victim}, holder of stage {key}, which the other sweep waits for"
        else:
            if (picked := self.pick_trial(fault)) is None:
                return
            victim, node_id = picked
            fault.target = f"trial pid {victim} (no stage was waited for)"
        fault.phase = self.phase(node_id)
        os.kill(victim, signal.SIGSTOP)
        try:
            stopped = wait_until(lambda: Path(f"/proc/{victim}/stat").read_text().split(") ", 1)[1][0] == "T",
                                 timeout=10, every=0.1)
            time.sleep(PAUSE_S)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)
        if stopped:
            fault.confirmed = f"pid {victim} in state T for {PAUSE_S} s (lease timeout {LEASE_TIMEOUT_S} s), then continued"


# --- the checker ----------------------------------------------------------------------------------
@dataclass
class Verdict:
    stages: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    left_running: list[str] = field(default_factory=list)
    relogged: list[str] = field(default_factory=list)
    short: list[str] = field(default_factory=list)
    missing_artifacts: list[str] = field(default_factory=list)
    jobs_not_succeeded: list[str] = field(default_factory=list)
    too_slow: list[str] = field(default_factory=list)
    """The faulted sweeps' wall time past `MAX_TIME_RATIO` times the fault-free run's."""

    @property
    def failures(self) -> dict[str, list[str]]:
        return {name: values for name, values in asdict(self).items() if name != "stages" and values}


def check_runs(client: MlflowClient, stages: dict[str, Stage], runs: list[Run]) -> Verdict:
    """The invariants on the sweeps' runs (`runs`, every active run of their experiments) for the
    stages they plan: one FINISHED trained run per stage, each epoch metric logged once per step up
    to the stage's last epoch, its model and checkpoint there, no run left RUNNING."""
    verdict = Verdict(stages=len(stages))
    verdict.left_running = sorted(run.info.run_name for run in runs if run.info.status == "RUNNING")
    trained: dict[str, list[Run]] = {key: [] for key in stages}
    for run in runs:
        key = run.data.tags.get(STAGE_KEY_TAG)
        if (run.data.tags.get(ROLE_TAG) == "trial" and run.info.status == "FINISHED"
                and REUSED_FROM_TAG not in run.data.tags and key in trained):
            trained[key].append(run)
    verdict.lost = sorted(stages[key].name for key, found in trained.items() if not found)
    verdict.duplicated = sorted(f"{stages[key].name}: {len(found)} runs" for key, found in trained.items() if len(found) > 1)
    for key, found in trained.items():
        for run in found:
            for metric in sorted(set(run.data.metrics) & set(EPOCH_METRICS)):
                steps = [entry.step for entry in client.get_metric_history(run.info.run_id, metric)]
                if len(steps) != len(set(steps)):
                    verdict.relogged.append(f"{run.info.run_name} {metric}: steps {sorted(steps)}")
                if max(steps) != stages[key].epochs - 1:
                    verdict.short.append(f"{run.info.run_name} {metric}: last step {max(steps)} of {stages[key].epochs} epochs")
            artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
            if not {"model.pt", "checkpoint"} <= artifacts:
                verdict.missing_artifacts.append(f"{run.info.run_name}: has {sorted(artifacts)}")
    return verdict


def check(spec_paths: list[Path], max_batches: int, last_jobs: dict[str, str], jobs_client: Any) -> Verdict:
    """The invariants, read from MLflow (runs, metric histories, artifacts) and Ray (the jobs)."""
    stages, names = {}, []
    for path in spec_paths:
        spec = load_spec(str(path))
        stages.update(checked_plan(spec, None, None, max_batches, True, tracking=False, data=False).stages)
        names.append(spec.name)
    tracker = Tracker(os.environ["MLFLOW_TRACKING_URI"])
    experiments = [e.experiment_id for e in tracker.client.search_experiments() if e.name in names]
    verdict = check_runs(tracker.client, stages, tracker.search_all(experiments, ""))
    verdict.jobs_not_succeeded = [f"{name}: {job} {status}" for name, job in last_jobs.items()
                                  if (status := str(jobs_client.get_job_status(job))) != "SUCCEEDED"]
    return verdict


# --- the soak -------------------------------------------------------------------------------------
def write_specs(folder: Path, prefix: str, args: argparse.Namespace, seed_offset: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in sweep_specs(prefix, list(range(seed_offset, seed_offset + args.seeds)), args.pretrain_epochs,
                            args.epochs, args.max_failures):
        path = folder / f"{spec['name']}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        paths.append(path)
    return paths


def run_sweeps(soak: Soak, paths: list[Path], faults: list[Fault], label: str) -> float:
    """Submit the sweeps at once, inject `faults` on their schedule while they run, and say every
    `PROGRESS_S` how many stages are done; wall seconds until every sweep's latest job has ended."""
    specs = {path.stem: path for path in paths}
    started = time.monotonic()
    for path in paths:
        soak.submit(path)
    pending, threads, progress_at = list(faults), [], PROGRESS_S
    while soak.running() or any(thread.is_alive() for thread in threads):
        elapsed = time.monotonic() - started
        if elapsed >= progress_at:  # in a thread: an MLflow outage must not hold up the faults or the clock
            threading.Thread(target=soak.say_progress, args=(label, elapsed), daemon=True).start()
            progress_at += PROGRESS_S
        while pending and pending[0].scheduled_s <= elapsed and soak.running():
            thread = threading.Thread(target=soak.inject, args=(pending.pop(0), specs), daemon=True)
            thread.start()
            threads.append(thread)
        soak.watch(specs)
        time.sleep(1)
    return time.monotonic() - started


def soak(args: argparse.Namespace, state: Path) -> int:
    """The soak on the cluster in `state/cluster`, whose environment this process has."""
    history = (args.history or state / "history.jsonl").resolve()
    rng = random.Random(args.seed)
    faults = schedule(rng, args.faults, args.mean_gap, tuple(args.kinds))
    options = {key: value for key, value in vars(args).items() if key not in ("on_cluster", "history")}
    history.write_text(json.dumps({"options": options,
                                   "schedule": [(f.scheduled_s, f.kind) for f in faults]}) + "\n")
    print(f"chaos soak seed {args.seed}: {args.faults} faults, history in {history}; state in {state}", flush=True)
    soak = Soak(state / "cluster", args.max_batches, history, rng, args.long_outages)
    baseline_s = None
    if not args.no_baseline:
        baseline_s = run_sweeps(soak, write_specs(state / "baseline", f"chaos{args.seed}-base", args, 1000), [],
                                "fault-free run")
        print(f"fault-free run: {baseline_s:.0f} s", flush=True)
        soak.jobs.clear()
    paths = write_specs(state / "soak", f"chaos{args.seed}", args, 0)
    soak.started = time.monotonic()
    wall_s = run_sweeps(soak, paths, faults, "faulted run")
    verdict = check(paths, args.max_batches, dict(soak.jobs), soak.jobs_client)
    ray.shutdown()
    if baseline_s and wall_s > MAX_TIME_RATIO * baseline_s:
        verdict.too_slow.append(f"{wall_s:.0f} s against {baseline_s:.0f} s fault-free")
    injected = [fault for fault in faults if fault.at_s is not None]
    confirmed = [fault for fault in injected if fault.confirmed]
    with open(history, "a") as out:
        out.write(json.dumps({"verdict": asdict(verdict), "unexpected_job_ends": soak.unexpected, "wall_s": wall_s,
                              "baseline_s": baseline_s}) + "\n")
    for name, values in verdict.failures.items():
        print(f"{name}: {len(values)}: " + "; ".join(values[:10]), flush=True)
    for line in soak.unexpected:
        print(f"unexpected job end: {line}", flush=True)
    kinds = Counter(fault.kind for fault in confirmed)
    ratio = f"{wall_s / baseline_s:.2f}" if baseline_s else "n/a"
    print(f"wall {wall_s:.0f} s" + (f" against {baseline_s:.0f} s fault-free" if baseline_s else ""))
    print(f"faults {len(confirmed)} confirmed of {len(injected)} (kinds {len(kinds)}: "
          f"{', '.join(f'{kind} {count}' for kind, count in sorted(kinds.items()))}); stages {verdict.stages}; "
          f"lost {len(verdict.lost)}; duplicated {len(verdict.duplicated)}; left running {len(verdict.left_running)}; "
          f"time ratio {ratio}", flush=True)
    return 1 if verdict.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, required=True, help="draws the faults' schedule, kinds and targets")
    parser.add_argument("--faults", type=int, required=True, help="faults to inject")
    parser.add_argument("--seeds", type=int, default=12, help="training seeds per sweep: sweep a has 5 stages a seed")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=6, help="quantise epochs of each trial")
    parser.add_argument("--max-batches", type=int, default=8, help="batches per epoch")
    parser.add_argument("--max-failures", type=int, default=20, help="Tune's retries per trial")
    parser.add_argument("--mean-gap", type=float, default=60.0, help="mean seconds between faults")
    parser.add_argument("--workers", type=int, default=2, help="Ray worker nodes (1 CPU each)")
    parser.add_argument("--kinds", type=lambda text: text.split(","), default=list(FAULT_KINDS),
                        help=f"fault kinds to draw from, comma-separated (default all: {','.join(FAULT_KINDS)})")
    parser.add_argument("--long-outages", type=int, default=1,
                        help="MLflow restarts (the first ones) that outlast its clients' retry budget")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fault-free run (no time ratio)")
    parser.add_argument("--known-bad", action="store_true", help="lease fencing off on the nodes: the checker must fail")
    parser.add_argument("--history", type=Path, help="the fault history, JSON lines (default: in the state folder)")
    parser.add_argument("--on-cluster", type=Path, help=argparse.SUPPRESS)  # the soak itself, in the cluster's environment
    args = parser.parse_args(argv)
    if unknown := set(args.kinds) - set(FAULT_KINDS):
        parser.error(f"--kinds: no fault kind {', '.join(sorted(unknown))} (kinds: {', '.join(FAULT_KINDS)})")
    if args.on_cluster:
        return soak(args, args.on_cluster)
    # `timeout` or `kill` ends the soak as Ctrl-C does: the cluster's processes are stopped too.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    state = Path(tempfile.mkdtemp(prefix="bnew-chaos-"))
    state.chmod(0o755)  # PostgreSQL runs as its own user
    node_env = {**LEASE_ENV, "BNEW_STORAGE_PATH": str(state / "storage"),
                **({"BNEW_SWEEP_UNFENCED": "1"} if args.known_bad else {})}
    # Ray reads its token settings when it is imported: the soak runs in a process started with the cluster's.
    with LoopbackCluster(state / "cluster", args.workers, "postgres", node_env=node_env) as cluster:
        command = [sys.executable, "-m", "bench.chaos", *(sys.argv[1:] if argv is None else argv), "--on-cluster", str(state)]
        return subprocess.run(command, env=cluster.env, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
