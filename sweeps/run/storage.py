"""Tune storage (checkpoints and experiment state): a local folder, or an S3-compatible bucket.

Tune reads and writes its storage through pyarrow file systems, so `storage_path` may be a
folder (`/shared/ray_results`) or a URI (`s3://bucket/prefix`). For S3, pyarrow's
`S3FileSystem` takes its settings from the standard AWS environment: `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`), `AWS_DEFAULT_REGION`/`AWS_REGION`, and, for
an S3-compatible server other than AWS (MinIO, Ceph, ...), `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (`http://HOST:PORT` for plain HTTP). Every node needs them, as the trials
upload their own checkpoints.
"""

from __future__ import annotations

import os

import ray
from pyarrow.fs import FileSelector, FileSystem, FileType

from bnew_core.config import BnewError
from sweeps.core.addresses import is_local

SHARED_ENV = "BNEW_STORAGE_SHARED"
"""`1`: the local storage folder is a file system every node of the cluster mounts (NFS, a
Docker volume on one host), so several machines may use it."""


def experiment_uris(storage: str) -> list[str]:
    """The Tune experiments under a sweep's storage folder (local or a URI), oldest first: the
    experiments are named by their start time. `--debug` work folders are not experiments."""
    filesystem, root = FileSystem.from_uri(storage)
    entries = filesystem.get_file_info(FileSelector(root, allow_not_found=True))
    names = sorted(entry.base_name for entry in entries if entry.type == FileType.Directory and entry.base_name != "debug")
    return [f"{storage.rstrip('/')}/{name}" for name in names]


def node_machines() -> list[str]:
    """The addresses of the machines the connected Ray cluster's live nodes run on."""
    return sorted({node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]})


def check_storage_reaches_every_node(storage: str, machines: list[str]) -> None:
    """Refuse a local storage folder when the connected Ray cluster spans several `machines`:
    each trial would write its checkpoints to its own machine's disk, where neither a retry on
    another node nor `bnew sweep resume` finds them. Nodes on one machine (a loopback cluster)
    share its disk; a folder every machine mounts is declared with `BNEW_STORAGE_SHARED=1`."""
    if not is_local(storage) or os.environ.get(SHARED_ENV) == "1":
        return
    if len(machines) > 1:
        raise BnewError(
            f"storage_path: {storage} is a local folder, but the Ray cluster has nodes on {len(machines)} machines "
            f"({', '.join(machines)}); use an s3://bucket/prefix storage_path (or BNEW_STORAGE_PATH), or set "
            f"{SHARED_ENV}=1 if every node mounts this folder"
        )
