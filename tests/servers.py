"""Helpers for the servers the tests start (MLflow, moto's S3): a free loopback port, and
stopping a server process for good."""

from __future__ import annotations

import socket
import subprocess


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
