"""`bnew export` and `bnew sweep export`: a finished trial's binary network as an OpenVINO IR
(`bnew_core.export`), from a model.pt or from its MLflow run, logged back to the run under
`export/` (`sweeps.records.model_exports`). OpenVINO is the optional extra `export`."""

from __future__ import annotations

import tempfile
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from sweeps.cli.common import fail, reaching, user_errors

if TYPE_CHECKING:
    from bnew_core.export import ExportCheck
    from sweeps.records.tracker import Tracker

INSTALL_HINT = "pip install 'bnew-sweep[export]'"
CHECK_HELP = ("Also run the whole test split through the PyTorch model and through OpenVINO and print how "
              "they agree (exit 1 if they do not).")
TRACKING_HELP = "MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else the project's .bnew/mlflow.db."
LOG_HELP = "Log the exported files to the trial's run under export/, their sizes as export_* metrics."


def require_openvino() -> None:
    if find_spec("openvino") is None:
        fail(f"exporting needs OpenVINO, an optional extra: {INSTALL_HINT}")


def export_and_report(model_path: Path, out: Path, run_id: str | None, check: bool,
                      tracker: "Tracker | None") -> "ExportCheck | None":
    """Export one model.pt into `out`, print what was written (and the check's line), log it to
    `run_id` when a tracker is given. Returns the check, if it ran."""
    from bnew_core.export import check_export, export_model, trial_data  # lazy: torch, OpenVINO
    from bnew_core.models import load_trained
    from sweeps.records.model_exports import log_export

    data = trial_data(load_trained(model_path).config)
    export = export_model(model_path, out, run_id, data)
    files = export.manifest["files"]
    weights = export.manifest["binary_weights"]
    typer.echo(f"exported {out}: model.xml {files['model.xml']['bytes']} bytes, model.bin {files['model.bin']['bytes']} "
               f"bytes (binary weights {weights['bytes']} bytes, {weights['float32_bytes']} as float32)")
    result = check_export(model_path, export, data) if check else None
    if result is not None:
        typer.echo(("" if result.passed else "check FAILED: ") + result.line())
    if tracker is not None and run_id is not None:
        log_export(tracker, run_id, out, export.manifest, result.metrics() if result else None)
        typer.echo(f"logged to run {run_id} under export/")
    return result


def open_tracker(uri: str) -> "Tracker":
    from sweeps.records.store import store_exists
    from sweeps.records.tracker import Tracker

    if not store_exists(uri):
        fail(f"tracking_uri: no MLflow store at {uri} (pass --tracking-uri)")
    return Tracker(uri)


def export(
    source: str = typer.Argument(..., help="A trial's model.pt, or the MLflow run id of a finished quantise trial."),
    out: Path = typer.Option(..., "--out", help="Folder for model.xml, model.bin and export.json."),
    check: bool = typer.Option(False, "--check", help=CHECK_HELP),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=TRACKING_HELP),
    log: bool = typer.Option(True, "--log/--no-log", help=LOG_HELP + " (a RUN_ID only)"),
) -> None:
    """Write a trained binary network as an OpenVINO IR: BinaryConvolution on 1-bit weights, scale
    and BatchNorm folded into one multiply-add per channel, and export.json (input size and
    normalisation, config, sha256 of both files) beside it."""
    require_openvino()
    result = None
    if Path(source).is_file():
        with user_errors():
            result = export_and_report(Path(source), out, None, check, None)
    else:
        from sweeps.analysis.report import default_tracking_uri
        from sweeps.records.model_exports import download_run_model

        uri = tracking_uri or default_tracking_uri(source)  # a run id names no preset: the project's store
        with user_errors(), reaching(uri), tempfile.TemporaryDirectory() as folder:
            tracker = open_tracker(uri)
            model_path, holder = download_run_model(tracker, source, Path(folder))
            result = export_and_report(model_path, out, holder, check, tracker if log else None)
    if result is not None and not result.passed:
        raise typer.Exit(code=1)


def sweep_export(
    name: str = typer.Argument(..., help="Sweep name (its MLflow experiment)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder; each trial goes to OUT/<trial run name>. "
                                       "Default: exports/NAME."),
    best: bool = typer.Option(False, "--best",
                              help="Only the most accurate trial of each cell (final binary test accuracy)."),
    check: bool = typer.Option(False, "--check", help=CHECK_HELP),
    tracking_uri: Optional[str] = typer.Option(None, envvar="MLFLOW_TRACKING_URI", help=TRACKING_HELP),
    log: bool = typer.Option(True, "--log/--no-log", help=LOG_HELP),
) -> None:
    """Export every finished quantise trial of a sweep (or the best of each cell) as an OpenVINO IR."""
    require_openvino()
    from bnew_core.config import BnewError
    from sweeps.analysis.report import default_tracking_uri
    from sweeps.records.model_exports import download_run_model, sweep_export_targets

    uri = tracking_uri or default_tracking_uri(name)
    out = out or Path("exports") / name
    failed = 0
    with user_errors(), reaching(uri):
        tracker = open_tracker(uri)
        targets = sweep_export_targets(tracker, name, best)
        if not targets:
            fail(f"sweep {name}: no finished quantise trials to export")
        for target in targets:
            accuracy = f" ({target.accuracy:.2f}%)" if target.accuracy is not None else ""
            typer.echo(f"{target.name}{accuracy}:")
            with tempfile.TemporaryDirectory() as folder:
                try:
                    model_path, holder = download_run_model(tracker, target.run_id, Path(folder))
                    result = export_and_report(model_path, out / target.name, holder, check, tracker if log else None)
                except BnewError as exc:  # one trial's problem: the others still export
                    typer.echo(f"error: {exc}", err=True)
                    failed += 1
                    continue
            failed += result is not None and not result.passed
    typer.echo(f"exported {len(targets) - failed} of {len(targets)} trials to {out}")
    if failed:
        raise typer.Exit(code=1)


def register_export_commands(app: typer.Typer, sweep_app: typer.Typer) -> None:
    """`bnew export` and `bnew sweep export`."""
    app.command("export")(export)
    sweep_app.command("export")(sweep_export)
