"""Checkpoints: plain dicts of tensors and numbers, written atomically, loadable with
`torch.load(weights_only=True)` (no pickled code runs when a checkpoint is read)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .config import BnewError

CHECKPOINT_FORMAT = "bnew-checkpoint-v1"
MODEL_FORMAT = "bnew-model-v1"


def save_atomic(payload: dict[str, Any], path: Path) -> Path:
    """Write to a temporary file in the same folder, flush it to disk, then rename over `path`:
    a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return path


class CorruptCheckpointError(BnewError):
    """A file does not match the checksum stored beside it (truncated or corrupted)."""


def checksum_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.sha256")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: Path) -> None:
    """`path.sha256` beside `path`, in `sha256sum` format, so a damaged copy is detected on load."""
    temporary = checksum_path(path).with_name(f".{checksum_path(path).name}.tmp{os.getpid()}")
    temporary.write_text(f"{sha256(path)}  {path.name}\n")
    os.replace(temporary, checksum_path(path))


def verify_checksum(path: Path, field: str, required: bool = False) -> None:
    """Raise `CorruptCheckpointError` if `path` does not match the checksum beside it (or, if
    `required`, has none)."""
    stored = checksum_path(path)
    if required and not (path.is_file() and stored.is_file()):
        raise CorruptCheckpointError(f"{field}: {path} or its checksum {stored.name} is missing")
    if stored.is_file() and stored.read_text().split()[0] != sha256(path):
        raise CorruptCheckpointError(f"{field}: {path} does not match its checksum {stored.name} (truncated or corrupted)")


def load_file(path: Path, expected_format: str, field: str) -> dict[str, Any]:
    """Load a checkpoint or model file; any problem becomes a one-line `BnewError` naming it."""
    if not path.is_file():
        raise BnewError(f"{field}: {path} does not exist")
    verify_checksum(path, field)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted or foreign files fail in many ways
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnewError(f"{field}: {path} is not a readable checkpoint ({reason[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != expected_format:
        raise BnewError(f"{field}: {path} is not a {expected_format} file")
    return payload


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
