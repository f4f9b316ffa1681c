"""`python -m bench.mlflow_auth`: what MLflow's basic-auth app costs per request, side by side.

Starts three `mlflow server` processes on loopback (SQLite, one worker each): without auth, with
the basic-auth app as MLflow ships it, and with the basic-auth app and its login cache
(`auth_cache_ttl_seconds`, as `cluster/mlflow_basic_auth.ini` and `cluster/start_local.sh` set
it). Sends the same request (`experiments/get-by-name`) `--requests` times to each, in turn,
and prints the median and p95 latency and the ratios. A trial sends about 38 requests, so the
per-request cost times 38 is what the server spends on each trial.
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
PASSWORD = "bench-password-1234"
SERVERS = {"no auth": None, "basic auth": 0, "basic auth, cached": 300}
"""Server label -> the basic-auth app's `auth_cache_ttl_seconds` (None: the plain server)."""


def start_server(folder: Path, cache_ttl: int | None) -> tuple[subprocess.Popen, int]:
    folder.mkdir(parents=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    if cache_ttl is not None:
        (folder / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{folder / 'auth.db'}\nadmin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"auth_cache_ttl_seconds = {cache_ttl}\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(folder / "auth.ini"), MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD,
                   MLFLOW_FLASK_SERVER_SECRET_KEY="bench")
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
        servers = {label: start_server(Path(state) / str(index), ttl)
                   for index, (label, ttl) in enumerate(SERVERS.items())}
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
