"""What a sweep needs beyond a valid spec, checked before Ray or MLflow start. Each check raises a
one-line `BnewError` naming the spec's key; the command line turns it into exit status 2."""

from __future__ import annotations

import tempfile

from bnew_core.config import BnewError
from sweeps.core.addresses import check_tracking_reaches, is_local, local_folder
from sweeps.core.plan import MAX_TRIALS, Plan, missing_data
from sweeps.core.search import planned_counts
from sweeps.records.store import check_tracking_uri


def check_sweep(plan: Plan, on_this_machine: bool, yes: bool, tracking: bool = True) -> None:
    """A size confirmed with `yes` over `MAX_TRIALS`, a tracking URI MLflow can use (unless
    `tracking` is off: a plan that does not look MLflow up) and, if the sweep's driver runs on
    this machine, a storage folder it can write and its datasets."""
    trials = planned_counts(plan).trials
    if trials > MAX_TRIALS and not yes:
        raise BnewError(f"axes: {trials} trials, more than {MAX_TRIALS}; check the grid with `bnew sweep plan`, "
                        "then pass --yes to run it")
    if tracking:
        check_tracking_uri(plan.spec.resolved_tracking_uri())
    if on_this_machine:
        check_storage_path(plan.spec.resolved_storage_path())
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


def check_before_run(plan: Plan, address: str | None) -> None:
    """Right before the driver opens MLflow, on its own machine: the datasets are here, and the
    cluster at `address` (`local`: this machine only) reaches the tracking store."""
    check_data(plan)
    check_tracking_reaches(plan.spec.resolved_tracking_uri(), address)
