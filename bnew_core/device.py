"""Which device a trial trains on: `TrialConfig.device` resolved against what this process sees.

    choose_device(requested, observe_cuda()) -> DeviceChoice

`auto` takes the first visible CUDA device, else the CPU with the reason kept in the choice
(the trainer prints it and hands it to its callbacks: nothing falls back silently). `cuda` and
`cuda:N` that this process cannot honour raise a `BnewError` at once: a trial that asked for a
GPU and got none would only run many times slower, and a sweep never retries a `BnewError`.
The observation and the decision are apart, so the decision is tested for every case on any
machine (tests/test_device.py) and the observation once, for real.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from .config import DEVICE_PATTERN, BnewError


@dataclass(frozen=True)
class CudaView:
    """What this process can see of CUDA."""

    count: int
    """CUDA devices torch sees (after CUDA_VISIBLE_DEVICES)."""
    visible: str | None
    """CUDA_VISIBLE_DEVICES as this process got it (None: unset). Ray sets it to a trial's own
    GPU ids; it is read once, when CUDA initialises, so a later change does not count."""
    built: bool = True
    """Whether this torch build has CUDA at all."""

    def why_none(self) -> str:
        """Why no CUDA device can be used here (when `count` is 0)."""
        if not self.built:
            return f"torch {torch.__version__} is built without CUDA"
        return f"no CUDA device visible ({visible_text(self.visible)})"


def visible_text(visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for messages: unset, set empty (no GPU given to the process) or the ids."""
    return "CUDA_VISIBLE_DEVICES unset" if visible is None else f"CUDA_VISIBLE_DEVICES={visible!r}"


def observe_cuda() -> CudaView:
    """This process's view; `device_count` is 0 without a driver or GPU and does not fail."""
    return CudaView(torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                    torch.backends.cuda.is_built())


@dataclass(frozen=True)
class DeviceChoice:
    """A resolved `device`: what the trial trains on, and why when it is not what was asked."""

    requested: str
    device: torch.device
    fallback: str | None
    """Why `auto` did not get a GPU, e.g. "auto: no CUDA device visible (CUDA_VISIBLE_DEVICES
    unset)"; None when the trial trains on what it asked for."""
    visible: str | None
    """CUDA_VISIBLE_DEVICES as the trial's process saw it (None: unset)."""

    def record(self) -> dict[str, str]:
        """Plain strings for logs and tags: `device`, `gpu_ids` (CUDA_VISIBLE_DEVICES as seen, `unset`
        when it was not set, empty when it was set empty) and, on a fallback, `device_fallback`."""
        fallback = {"device_fallback": self.fallback} if self.fallback else {}
        return {"device": str(self.device), "gpu_ids": "unset" if self.visible is None else self.visible, **fallback}


def choose_device(requested: str, view: CudaView) -> DeviceChoice:
    """Resolve `requested` (auto, cpu, cuda or cuda:N) against `view`."""
    if not re.fullmatch(DEVICE_PATTERN, requested):  # TrialConfig checks this too; bench passes its own
        raise BnewError(f"device: {requested!r} is not a device (auto, cpu, cuda, cuda:N)")
    kind, _, index_text = requested.partition(":")
    index = int(index_text or 0)
    if kind == "cpu" or (kind == "auto" and view.count == 0):
        fallback = f"auto: {view.why_none()}" if kind == "auto" else None
        return DeviceChoice(requested, torch.device("cpu"), fallback, view.visible)
    fix = "use device: auto (the CPU when no GPU is there) or cpu, or run the trial where a GPU is visible"
    if view.count == 0:
        raise BnewError(f"device: {requested} requested but {view.why_none()}; {fix}")
    if index >= view.count:
        raise BnewError(
            f"device: {requested} requested but only {view.count} CUDA device(s) visible "
            f"({visible_text(view.visible)}); use cuda:0 to cuda:{view.count - 1} "
            "(a Ray trial sees only its own GPUs, from cuda:0), or cuda"
        )
    return DeviceChoice(requested, torch.device("cuda", index), None, view.visible)


def resolve_device(requested: str) -> torch.device:
    """The device alone, for tools that print their own (bench); the trainer uses `choose_device`."""
    return choose_device(requested, observe_cuda()).device
