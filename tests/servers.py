"""Helpers for the servers the tests start (MLflow, moto's S3): a free loopback port, an MLflow
tracking server, stopping a server process for good, the processes below one (a Ray node's, a
driver's), a short temp folder for a Ray and the Debian packages some tests need."""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

CHROMIUM = Path("/usr/bin/chromium")
DEBIAN_PACKAGES: dict[str, Callable[[], bool]] = {
    "chromium": CHROMIUM.is_file,  # headless, for screenshots and MLflow's UI
    "postgresql": lambda: bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")),  # cluster/postgres_local.sh
    "faketime": lambda: Path("/usr/bin/faketime").is_file(),  # a process whose clock is shifted
}
"""Package -> whether it is installed; a test marked `debian(package)` needs it (conftest.py)."""


def debian_missing(*packages: str) -> str | None:
    """One line naming what to install when any of Debian's `packages` is missing, else None."""
    missing = sorted({package for package in packages if not DEBIAN_PACKAGES[package]()})
    return f"needs Debian's {' and '.join(missing)}: apt-get install {' '.join(missing)}" if missing else None


def short_temp_dir(prefix: str) -> str:
    """A folder of its own directly under /tmp (Ray's socket paths in it must stay under 107 bytes,
    which pytest's temp folders are not), removed when the test session ends: a Ray session
    leaves tens of megabytes there, and a suite run starts dozens."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


SWEEP_SETTINGS = ("BNEW_SWEEP_FAULT", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "BNEW_STORAGE_PATH")
"""What a sweep of a test's own must not inherit from the caller's environment."""


def sweep_env(**extra: str) -> dict[str, str]:
    """This process's environment for a sweep of its own: no injected fault, Ray cluster, tracking
    server or storage unless given in `extra`, and a short temp folder for a Ray it starts with
    `--local` (Ray's socket paths must stay short; other Rays on the machine keep theirs)."""
    env = {key: value for key, value in os.environ.items() if key not in SWEEP_SETTINGS}
    return {**env, **extra, "RAY_TMPDIR": extra.get("RAY_TMPDIR") or short_temp_dir("bnew-ray-")}


def free_port() -> int:
    """A port nothing listens on now (engineers and CI jobs start servers side by side)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process on the machine (`-ww`: whole lines;
    without a terminal ps cuts them at 80 columns)."""
    table = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = (line.split(None, 2) for line in table.splitlines())
    return {int(row[0]): (int(row[1]), row[2] if len(row) > 2 else "") for row in rows}


def descendants(pid: int, processes: dict[int, tuple[int, str]]) -> list[int]:
    """Every process below `pid` in `processes` (a `process_table()`)."""
    children = [child for child, (parent, _) in processes.items() if parent == pid]
    return children + [grandchild for child in children for grandchild in descendants(child, processes)]


@contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real MLflow tracking server with artifact serving, its store in `root`, on a free loopback
    port; yields its URL."""
    port = free_port()
    with open(root / "server.log", "w") as log:  # the server keeps its own copy of the file
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a busy 2-core machine needs minutes
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                assert process.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-3000:]
                time.sleep(1)
        yield url
    finally:
        stop(process)
