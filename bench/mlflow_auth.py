"""`python -m bench.mlflow_auth`: what MLflow's basic-auth app costs per request, side by side.

Starts three `mlflow server` processes on loopback (SQLite, one worker each): without auth, with
the basic-auth app as the cluster ships it (`cluster/mlflow_basic_auth.ini`, whose login cache
`auth_cache_ttl_seconds` keeps a good login for a while), and with the same ini without the
cache, as MLflow ships it. Sends the same request (`experiments/get-by-name`) `--requests` times
to each, in turn, and prints the median and p95 latency and the ratios. A trial sends about 38
requests, so the per-request cost times 38 is what the server spends on each trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.sweep_load import free_port, percentile

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
PASSWORD = "bench-password-1234"
SERVERS = {"no auth": None, "basic auth": False, "basic auth, cached": True}
"""Server label -> whether the basic-auth app keeps the shipped ini's login cache (None: no auth)."""


def auth_ini(folder: Path, cached: bool) -> str:
    """cluster/mlflow_basic_auth.ini with its users in `folder`, without the login cache unless `cached`."""
    lines = (REPO / "cluster" / "mlflow_basic_auth.ini").read_text().replace(
        "sqlite:////var/lib/mlflow-auth/", f"sqlite:///{folder}/").splitlines()
    return "\n".join(line for line in lines if cached or not line.startswith("auth_cache_ttl_seconds")) + "\n"


def start_server(folder: Path, cached: bool | None) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    if cached is not None:
        (folder / "auth.ini").write_text(auth_ini(folder, cached))
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"), MLFLOW_AUTH_ADMIN_USERNAME="admin",
                   MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY="bench")
        command[2:2] = ["--app-name", "basic-auth"]
    log = open(folder / "server.log", "w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), port


def wait_ready(port: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server on port {port} did not start in {timeout:.0f} s")


def latencies(port: int, authenticated: bool, count: int) -> list[float]:
    session, times = requests.Session(), []
    for _ in range(count):
        started = time.perf_counter()
        response = session.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name",
                               params={"experiment_name": "Default"},
                               auth=("admin", PASSWORD) if authenticated else None, timeout=60)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="requests per server (default 50)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bnew-auth-bench-") as state:
        servers = {label: start_server(Path(state) / str(index), cached)
                   for index, (label, cached) in enumerate(SERVERS.items())}
        try:
            for _, port in servers.values():
                wait_ready(port)
            measured = {label: latencies(port, SERVERS[label] is not None, args.requests)
                        for label, (_, port) in servers.items()}
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(timeout=30)
    plain = statistics.median(measured["no auth"])
    print(f"| server | median ms | p95 ms | median / no auth |  ({args.requests} requests each)")
    print("|---|---:|---:|---:|")
    for label, times in measured.items():
        print(f"| {label} | {statistics.median(times) * 1000:.1f} | {percentile(times, 0.95) * 1000:.1f} | "
              f"{statistics.median(times) / plain:.1f} |")


if __name__ == "__main__":
    main()
