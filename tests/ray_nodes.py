"""Ray nodes a test starts on loopback (`ray start`), each cluster on its own ports and temp folder,
stopped by process id: a head, and worker nodes with logical GPUs (Ray hands out GPU ids and sets
CUDA_VISIBLE_DEVICES without any hardware)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

from tests.servers import free_port, process_table, short_temp_dir

RAY = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "ray"


class LoopbackCluster:
    """Ray nodes of this test alone: its own ports and temp folder, stopped by process id (`ray
    stop` would stop every Ray of this user on the machine)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.temp_dir = short_temp_dir("bnew-res-")
        dropped = ("CUDA_VISIBLE_DEVICES", "RAY_ADDRESS")
        self.env = {key: value for key, value in os.environ.items() if key not in dropped}
        # No token authentication on this loopback cluster: with none set, Ray 2.60 turns it on by
        # itself when ~/.ray/auth_token exists, a file other clusters of this user share and rewrite.
        self.env.update(RAY_TMPDIR=self.temp_dir, RAY_AUTH_MODE="disabled")
        self.nodes: list[subprocess.Popen] = []

    def start(self, *args: str) -> None:
        """One node; `--block` keeps its `ray start` alive as the parent of the node's processes."""
        log = open(Path(self.temp_dir) / f"node{len(self.nodes)}.log", "w")
        self.nodes.append(subprocess.Popen(
            [str(RAY), "start", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", "0",
             "--disable-usage-stats", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start_head(self) -> None:
        self.start("--head", f"--port={self.port}", "--num-cpus", "1", "--num-gpus", "0", "--include-dashboard=false",
                   "--ray-client-server-port", str(free_port()), "--temp-dir", self.temp_dir)

    def start_worker(self) -> None:
        self.start(f"--address=127.0.0.1:{self.port}", "--num-cpus", "2", "--num-gpus", "2")

    def stop(self) -> None:
        """SIGKILL every process of these nodes: the `ray start`s, what they started, and anything
        naming this cluster's temp folder or port (Ray's client server), each by its id."""
        table = process_table()
        marks = (self.temp_dir, f"--address=127.0.0.1:{self.port}", f"--gcs-address=127.0.0.1:{self.port}")
        ours = {node.pid for node in self.nodes} | {
            pid for pid, (_, args) in table.items() if any(mark in args for mark in marks)}
        found = set(ours)
        while found:  # and their descendants
            found = {pid for pid, (parent, _) in table.items() if parent in found} - ours
            ours |= found
        for pid in ours - {os.getpid()}:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.kill(pid, signal.SIGKILL)
        for node in self.nodes:
            node.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """Until `condition()`; `timeout` only catches a hang (Ray's start takes minutes on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False
