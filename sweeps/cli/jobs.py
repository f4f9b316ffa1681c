"""`bnew sweep submit/jobs/logs/stop`: a sweep's driver as a Ray job on a cluster
(`sweeps.run.jobs`), so a laptop can submit, disconnect, and later follow, list and stop it."""

from __future__ import annotations

import time
from typing import Optional

import typer

from sweeps.cli.common import (
    MAX_BATCHES_HELP,
    MAX_EPOCHS_HELP,
    SET_HELP,
    SPEC_HELP,
    WAIT_HELP,
    load_sweep_plan,
    user_errors,
)

ADDRESS_HELP = ("Ray Jobs API of the cluster (http://HEAD:8265). Default: RAY_API_SERVER_ADDRESS, "
                "else RAY_ADDRESS.")
JOB_HELP = "Job id, as `bnew sweep submit` printed it (see `bnew sweep jobs`)."


def submit(
    spec: str = typer.Argument(..., help=SPEC_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    max_epochs: Optional[int] = typer.Option(None, help=MAX_EPOCHS_HELP),
    max_batches: Optional[int] = typer.Option(None, help=MAX_BATCHES_HELP),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + " The job runs the spec they make."),
    resume: bool = typer.Option(False, "--resume", help="Run `bnew sweep resume` (continue Tune's checkpoints) instead of `run`."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow as the cluster's nodes reach it (http://mlflow:5000). Default: the tracking URI used here, which must then not be this machine's."),
    data_dir: Optional[str] = typer.Option(None, help="BNEW_DATA_DIR for the job: the cluster's folder that relative dataset roots are read from. Default: the nodes' BNEW_DATA_DIR."),
    follow: bool = typer.Option(False, "--follow", help="Stream the driver's log until the job ends."),
    yes: bool = typer.Option(False, "--yes", help="Submit a sweep of more than 1,000 trials."),
    wait_for_resources: bool = typer.Option(False, "--wait-for-resources", help=WAIT_HELP),
) -> None:
    """Submit SPEC's driver to a Ray cluster as a Ray job; print the job id and how to follow it.

    Finished stages already in MLflow are not trained again, so submitting a stopped sweep again
    trains only what is missing."""
    from sweeps.records.links import experiment_url  # lazy: start-up (as every import in a command)
    from sweeps.run import jobs

    sweep_spec, _ = load_sweep_plan(spec, max_epochs, max_batches, set_, on_this_machine=False, yes=yes)  # paths: the cluster's
    here_uri = sweep_spec.resolved_tracking_uri()
    with user_errors():
        job_uri = jobs.cluster_tracking_uri(here_uri, tracking_uri, jobs.api_address(address))
        client = jobs.job_client(address)
    jobs.check_versions(client, lambda line: typer.echo(line, err=True))
    job_id = jobs.submit_sweep(client, sweep_spec, job_uri, "resume" if resume else "run", max_epochs, max_batches,
                               yes, data_dir, wait_for_resources)
    typer.echo(f"submitted job {job_id} (sweep {sweep_spec.name})")
    page = experiment_url(here_uri, sweep_spec.name)
    typer.echo(f"MLflow: {page}" if page else
               f"MLflow: experiment {sweep_spec.name!r} at {here_uri} (the job's driver creates it)")
    typer.echo(f"follow: bnew sweep logs {job_id} --follow | status: bnew sweep status {sweep_spec.name} | "
               f"stop: bnew sweep stop {job_id} | all: bnew sweep jobs")
    if follow:
        follow_logs(client, job_id)


def follow_logs(client: object, job_id: str) -> None:
    from sweeps.run import jobs

    jobs.stream_logs(client, job_id, lambda chunk: typer.echo(chunk, nl=False))
    status = client.get_job_status(job_id)
    typer.echo(f"job {job_id}: {status.value}")
    if status.value != "SUCCEEDED":  # a script following a job learns how it ended
        raise typer.Exit(code=1)


def clock(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else ""


def jobs(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """List this project's sweep jobs on the cluster with their state."""
    from sweeps.run import jobs as ray_jobs
    from sweeps.ui.tables import show_table

    with user_errors():
        client = ray_jobs.job_client(address)
        title = f"sweep jobs on {ray_jobs.api_address(address)}"
    rows = [(job.submission_id, job.metadata.get(ray_jobs.SWEEP_KEY, ""), job.status.value, clock(job.start_time),
             clock(job.end_time), (job.message or "").splitlines()[0][:80] if job.message else "")
            for job in ray_jobs.sweep_jobs(client)]
    show_table(title, ("job", "sweep", "state", "started", "ended", "message"), rows, whole=("job", "sweep"))


def logs(
    job: str = typer.Argument(..., help=JOB_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """Print the log of a sweep job's driver (what `bnew sweep run` prints)."""
    from sweeps.run import jobs as ray_jobs

    with user_errors():
        client = ray_jobs.job_client(address)
        ray_jobs.job_info(client, job)
    if follow:
        follow_logs(client, job)
    else:
        typer.echo(client.get_job_logs(job), nl=False)


def stop(
    job: str = typer.Argument(..., help=JOB_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Stop a sweep job: its driver marks the unfinished trial runs KILLED in MLflow and exits.

    Submitting the same spec again later trains only what is missing."""
    from sweeps.run import jobs as ray_jobs

    with user_errors():
        client = ray_jobs.job_client(address)
        typer.echo(f"job {job}: {ray_jobs.stop_job(client, job)}")


def register_job_commands(sweep_app: typer.Typer) -> None:
    """`bnew sweep submit/jobs/logs/stop`."""
    for command in (submit, jobs, logs, stop):
        sweep_app.command(command.__name__)(command)
