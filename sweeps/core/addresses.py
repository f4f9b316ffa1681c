"""Where things are, as the sweep's driver sees them: is a store or a folder on this machine's
disk, is an address this machine, and can a cluster's nodes reach the tracking store. One rule
each, used by `run`, `resume` and `submit` alike."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from bnew_core.config import BnewError

LOCAL_SCHEMES = ("file", "sqlite")
"""URI schemes of a location on this machine's disk (a plain path has none)."""


def is_local(location: str) -> bool:
    """True for a tracking store or storage folder on this machine's disk: a path (absolute or
    relative), a `file://` or a `sqlite:///` URI. Processes on other machines cannot reach it."""
    scheme, separator, _ = location.partition("://")
    return not separator or scheme in LOCAL_SCHEMES


def local_folder(location: str) -> Path:
    """The folder a local location names (`file:///x` -> `/x`)."""
    return Path(location.removeprefix("file://"))


def is_loopback(address: str) -> bool:
    """True for an address (a Ray cluster's, a tracking server's) on this machine's loopback."""
    return host_of(address) in ("localhost", "::1") or host_of(address).startswith("127.")


def host_of(address: str) -> str:
    return urlparse(address if "://" in address else f"http://{address}").hostname or ""


def is_this_machine(address: str) -> bool:
    """True for an address on this machine: its loopback, or one of its own interfaces' addresses
    (a driver on a cluster's head node, whose RAY_ADDRESS Ray sets to the head's own IP). A
    socket can be bound to an address only where it is local; nothing is sent."""
    if is_loopback(address):
        return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in host_of(address) else socket.AF_INET) as probe:
            probe.bind((host_of(address), 0))
    except OSError:  # not an address of this machine (or not an IP: a name is another machine's)
        return False
    return True


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster a driver joins: `--address`, else `RAY_ADDRESS` (what `ray.init` reads),
    else None (a Ray on this machine)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def is_other_machine(address: str | None) -> bool:
    """Whether the cluster a driver joins is at an address of another machine."""
    resolved = cluster_address(address)
    return resolved is not None and resolved not in ("auto", "local") and not is_this_machine(resolved)


def check_tracking_reaches(tracking_uri: str, address: str | None, field: str = "tracking_uri") -> None:
    """Trials on another machine (a cluster at `address`, or a node at that address) log to
    `tracking_uri`: it must be neither a store on this disk nor this machine's loopback. Raises a
    one-line `BnewError` naming `field`."""
    if not is_other_machine(address):
        return
    cluster = cluster_address(address)
    if is_local(tracking_uri):
        raise BnewError(f"{field}: {tracking_uri} is a store on this machine, but trials on cluster {cluster} run on "
                        "other machines; use an MLflow server (http://HOST:5000, `mlflow server --serve-artifacts`)")
    if is_loopback(tracking_uri):
        raise BnewError(f"{field}: {tracking_uri} names this machine but the cluster at {cluster} is another; "
                        "give the MLflow address its nodes reach (e.g. http://mlflow:5000)")
