"""What a sweep needs beyond a valid spec, checked before Ray or MLflow start. Each check raises a
one-line `BnewError` naming the spec's key; the command line turns it into exit status 2."""

from __future__ import annotations

import tempfile
from typing import Any

from bnew_core.config import BnewError
from sweeps.core.addresses import check_tracking_reaches, is_local, local_folder
from sweeps.core.plan import MAX_TRIALS, Plan, build_plan, grid_factors, grid_points, missing_data
from sweeps.core.search import trial_count
from sweeps.core.spec import SweepSpec
from sweeps.records.store import check_tracking_uri


def checked_plan(spec: SweepSpec, source: str | None = None, max_epochs: int | None = None,
                 max_batches: int | None = None, yes: bool = False, on_this_machine: bool = True,
                 tracking: bool = True, data: bool = True) -> Plan:
    """The plan of `spec` (read from `source`, for messages), or a `BnewError` naming what is
    wrong: more than `MAX_TRIALS` trials without `yes` (counted before any stage is built), then
    `check_sweep`'s checks (`on_this_machine` False: the driver runs on a cluster)."""
    points = grid_points(spec)
    check_size(spec, points, yes)
    plan = build_plan(spec, source or spec.name, max_epochs, max_batches, points)
    check_sweep(plan, on_this_machine, tracking, data)
    return plan


def check_size(spec: SweepSpec, points: list[dict[str, Any]], yes: bool) -> None:
    """More than `MAX_TRIALS` trials need `yes`, counted from the grid's points before any stage is
    built: a mistyped seed range is refused in a second, not planned for minutes, naming the
    largest axes (`axes.seed has 25000 values`)."""
    trials = trial_count(spec, points)
    if trials > MAX_TRIALS and not yes:
        largest = [f"{key} is {count}" if key == "search.samples" else f"{key} has {count} values"
                   for key, count in grid_factors(spec).items() if count > 1][:3]
        named = f" ({', '.join(largest)})" if largest else ""
        raise BnewError(f"axes: {trials} trials, more than {MAX_TRIALS}{named}; a mistyped axis? `--yes` plans and "
                        "runs a grid this size")


def check_sweep(plan: Plan, on_this_machine: bool, tracking: bool = True, data: bool = True) -> None:
    """A tracking URI MLflow can use (unless `tracking` is off: a plan that does not look MLflow
    up) and, if the sweep's driver runs on this machine, a storage folder it can write and (unless
    `data` is off: a plan says what is missing instead) its datasets."""
    if tracking:
        check_tracking_uri(plan.spec.resolved_tracking_uri())
    if on_this_machine:
        check_storage_path(plan.spec.resolved_storage_path())
        if data:
            check_data(plan)


def check_data(plan: Plan) -> None:
    """Every dataset root the plan reads is here (before Ray starts, rather than in every trial and its retries)."""
    missing = missing_data(plan)
    if missing:
        raise BnewError(missing[0])


def check_storage_path(storage: str) -> None:
    """A local storage path must be a folder this process can create and write in (a bucket
    reports its own errors on first use)."""
    if not is_local(storage):
        return
    path = local_folder(storage)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        raise BnewError(f"storage_path: {storage}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".bnew-write-check-"):
            pass
    except OSError as exc:
        raise BnewError(f"storage_path: {storage} cannot be written ({exc.strerror} in {existing})") from None


def check_devices(plan: Plan, in_process: bool) -> None:
    """Every stage's `device` can be had where it trains: in this process (`--debug`) as the
    trainer will resolve it (`device: cuda` without CUDA is refused here, not after the first
    stages); on Ray, `cuda` only with a GPU reserved for each trial, as a trial sees no other."""
    devices = sorted({stage.config["device"] for stage in plan.stages.values()})
    if in_process:
        from bnew_core.device import choose_device, observe_cuda  # heavy: torch

        for device in devices:
            choose_device(device, observe_cuda())
        return
    cuda = [device for device in devices if device.startswith("cuda")]
    if cuda and plan.spec.resources.gpu == 0:
        raise BnewError(f"device: {cuda[0]} needs a GPU reserved for each trial, but resources.gpu is 0 (a trial "
                        "sees only the GPUs it reserved); set resources.gpu (0.25: four trials a GPU), or device: auto")


def check_before_run(plan: Plan, address: str | None, in_process: bool) -> None:
    """Right before the driver opens MLflow, on its own machine: the datasets are here, the
    devices can be had (`in_process`: `--debug`), and the cluster at `address` (`local`: this
    machine only) reaches the tracking store."""
    check_data(plan)
    check_devices(plan, in_process)
    check_tracking_reaches(plan.spec.resolved_tracking_uri(), address)
