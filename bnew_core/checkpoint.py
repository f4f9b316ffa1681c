"""Checkpoints: plain dicts of tensors and numbers, written atomically, loadable with
`torch.load(weights_only=True)` (no pickled code runs when a checkpoint is read)."""

from __future__ import annotations

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


def load_file(path: Path, expected_format: str, field: str) -> dict[str, Any]:
    """Load a checkpoint or model file; any problem becomes a one-line `BnewError` naming it."""
    if not path.is_file():
        raise BnewError(f"{field}: {path} does not exist")
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
