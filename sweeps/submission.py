"""Sweeps as Ray jobs: `bnew sweep submit` sends a sweep's driver to a cluster through Ray's Jobs
API (the dashboard, `http://HEAD:8265`), so a laptop can submit, disconnect, and later follow
(`logs`), list (`jobs`) and stop (`stop`) it.

What travels with the job (its `runtime_env`): the spec, validated here, as YAML in the env var
`BNEW_SWEEP_SPEC` (so the cluster runs exactly the spec checked here, also for a preset; the job
writes it to a file and runs `bnew sweep run FILE`), the MLflow tracking URI as the cluster's
nodes reach it (`--tracking-uri`; a laptop behind an SSH tunnel reaches the same server at
another address, which is the one it uses for the experiment link), the debug caps, and how long
the driver may take to record its runs after `stop`. Not a `working_dir`: Ray 2.60
fetches a job's working_dir afresh when its driver calls `ray.init`, deleting the directory the
driver runs in. The project's code does not travel: it comes from the package installed on the
cluster's nodes (the image of `cluster/Dockerfile`, or `pip install` on each node). Trials
import torch and the trainer on every worker, and workers exist before any job, so the package
must be on the nodes anyway; shipping the source per job would also let a job's code differ from
its workers'. The submitting side therefore checks that its Ray and bnew-sweep versions are the
cluster's. Secrets do not travel either: the nodes hold MLflow's credentials in their
environment (`cluster/start_local.sh`, docker-compose's env file), and the Jobs API's token comes
from Ray's own token auth (`RAY_AUTH_MODE=token`, `RAY_AUTH_TOKEN_PATH` or `RAY_AUTH_TOKEN`),
which `JobSubmissionClient` sends as a bearer header.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import secrets
import shlex
import time
from typing import Any, Optional

import typer

ADDRESS_HELP = ("Ray Jobs API of the cluster (http://HEAD:8265). Default: RAY_API_SERVER_ADDRESS, "
                "else RAY_ADDRESS.")
JOB_HELP = "Job id, as `bnew sweep submit` printed it (see `bnew sweep jobs`)."
KIND_KEY, SWEEP_KEY = "bnew.kind", "bnew.sweep"
"""Job metadata that marks this project's jobs and names their sweep."""
JOB_ID_PREFIX = "bnew-"
SPEC_ENV = "BNEW_SWEEP_SPEC"
STOP_WAIT_S = 60
"""Seconds the driver gets after `stop`'s SIGTERM to mark its unfinished runs KILLED before Ray
sends SIGKILL (Ray's own default, RAY_JOB_STOP_WAIT_TIME_S=3, is too short for MLflow calls)."""
VERSION_CHECK_TIMEOUT_S = 120
VERSION_PROBE = ("python -c \"import importlib.metadata as m, json, ray; "
                 "print(json.dumps({'ray': ray.__version__, 'bnew-sweep': m.version('bnew-sweep')}))\"")


def fail(message: str) -> None:
    from sweeps.cli import fail as cli_fail

    cli_fail(message)


def api_address(address: str | None) -> str:
    """The Jobs API address: the option, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    resolved = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not resolved:
        fail("--address: give the cluster's Jobs API (http://HEAD:8265) or set RAY_API_SERVER_ADDRESS")
    if address:
        # Ray's client prefers the environment over its argument; the option must win here.
        os.environ["RAY_API_SERVER_ADDRESS"] = address
    return resolved


def job_client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster, or a one-line error if it cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard").setLevel(logging.WARNING)  # no INFO line per request
    resolved = api_address(address)
    try:
        return JobSubmissionClient(resolved)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"--address: the Ray Jobs API at {resolved} did not answer ({first[:200]}); "
             "with token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH")


def local_versions() -> dict[str, str]:
    import ray

    return {"ray": ray.__version__, "bnew-sweep": importlib.metadata.version("bnew-sweep")}


def cluster_versions(client: Any) -> dict[str, str]:
    """Ray and bnew-sweep versions on the cluster, from a tiny job that prints them."""
    job_id = client.submit_job(entrypoint=VERSION_PROBE, entrypoint_num_cpus=0,
                               submission_id=f"{JOB_ID_PREFIX}version-check-{secrets.token_hex(4)}",
                               metadata={KIND_KEY: "version-check"})
    deadline = time.monotonic() + VERSION_CHECK_TIMEOUT_S
    try:
        while not client.get_job_status(job_id).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                raise TimeoutError(f"no answer within {VERSION_CHECK_TIMEOUT_S} s")
            time.sleep(0.5)
        lines = [line for line in client.get_job_logs(job_id).splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"the probe job printed no versions ({client.get_job_info(job_id).message})")
        return json.loads(lines[-1])
    finally:
        if client.get_job_status(job_id).is_terminal():
            client.delete_job(job_id)


def version_mismatch(here: dict[str, str], cluster: dict[str, str]) -> str | None:
    """One line naming the versions that differ, or None when they all match."""
    differ = [f"{name} {here[name]} here, {cluster.get(name, 'missing')} on the cluster"
              for name in here if cluster.get(name) != here[name]]
    if not differ:
        return None
    return "warning: versions differ (" + "; ".join(differ) + "): install the same releases on both sides"


def check_versions(client: Any) -> None:
    try:
        mismatch = version_mismatch(local_versions(), cluster_versions(client))
    except Exception as exc:  # the check is advice; the sweep itself may still run
        typer.echo(f"warning: could not read the cluster's versions ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:160] if str(exc) else ''})", err=True)
        return
    if mismatch:
        typer.echo(mismatch, err=True)


def entrypoint(command: str, sweep: str, max_epochs: int | None, max_batches: int | None, yes: bool = False) -> str:
    """The driver's shell command on the cluster: the spec from `SPEC_ENV` into a file, then
    `bnew sweep run` (or `resume`) on it, exec'd so that `stop`'s SIGTERM reaches the driver."""
    parts = ["bnew", "sweep", command, f'"$spec_dir"/{shlex.quote(sweep)}.yaml']
    for option, value in (("--max-epochs", max_epochs), ("--max-batches", max_batches)):
        if value is not None:
            parts += [option, str(value)]
    if yes:  # confirmed here, where the size limit was checked
        parts.append("--yes")
    return (f'spec_dir=$(mktemp -d) && printenv {SPEC_ENV} >"$spec_dir"/{shlex.quote(sweep)}.yaml && '
            f'exec {" ".join(parts)}')


def cluster_tracking_uri(here: str, given: str | None, address: str) -> str:
    """The tracking URI the job's nodes use: `--tracking-uri`, else the one used here. A loopback
    URI is only right when the cluster is this machine too (behind a tunnel, `localhost:5000`
    here is the tunnel's end, not the server the nodes reach)."""
    from sweeps.tracking import is_local_uri, is_loopback

    uri = given or here
    if is_local_uri(uri):
        fail(f"tracking_uri: {uri} is a store on this machine; a submitted sweep logs from the cluster, "
             "so set MLFLOW_TRACKING_URI (or the spec's tracking_uri) to its MLflow server")
    if not given and is_loopback(uri) and not is_loopback(address):
        fail(f"--tracking-uri: {uri} names this machine but the cluster at {address} is another; "
             "give the MLflow address its nodes reach (e.g. --tracking-uri http://mlflow:5000)")
    return uri


def experiment_url(tracking_uri: str, sweep: str) -> str:
    """The MLflow UI page of the sweep's experiment (created now if it does not exist yet)."""
    from sweeps.tracking import Tracker

    experiment_id = Tracker(tracking_uri).experiment_id(sweep)
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"


def submit(
    spec: str = typer.Argument(..., help="Sweep spec YAML, or a preset name (see `bnew sweep list`)."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    max_epochs: Optional[int] = typer.Option(None, help="Cap every stage's epochs (a dry run)."),
    max_batches: Optional[int] = typer.Option(None, help="Cap batches per epoch (a dry run)."),
    resume: bool = typer.Option(False, "--resume", help="Run `bnew sweep resume` (continue Tune's checkpoints) instead of `run`."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow as the cluster's nodes reach it (http://mlflow:5000). Default: the tracking URI used here, which must then not be this machine's."),
    data_dir: Optional[str] = typer.Option(None, help="BNEW_DATA_DIR for the job: the cluster's folder that relative dataset roots are read from. Default: the nodes' BNEW_DATA_DIR."),
    follow: bool = typer.Option(False, "--follow", help="Stream the driver's log until the job ends."),
    yes: bool = typer.Option(False, "--yes", help="Submit a sweep of more than 1,000 trials."),
) -> None:
    """Submit SPEC's driver to a Ray cluster as a Ray job; print the job id and how to follow it.

    Finished stages already in MLflow are not trained again, so submitting a stopped sweep again
    trains only what is missing."""
    from mlflow.exceptions import MlflowException

    from sweeps.cli import load_sweep_plan
    from sweeps.spec import dump_spec

    sweep_spec, _ = load_sweep_plan(spec, max_epochs, max_batches, on_this_machine=False, yes=yes)  # paths: the cluster's
    here_uri = sweep_spec.resolved_tracking_uri()
    job_uri = cluster_tracking_uri(here_uri, tracking_uri, api_address(address))
    client = job_client(address)
    check_versions(client)
    job_spec = sweep_spec.model_copy(update={"tracking_uri": job_uri}) if sweep_spec.tracking_uri else sweep_spec
    env_vars = {SPEC_ENV: dump_spec(job_spec), "MLFLOW_TRACKING_URI": job_uri,
                "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), "PYTHONUNBUFFERED": "1"}
    if data_dir:
        env_vars["BNEW_DATA_DIR"] = data_dir
    job_id = f"{JOB_ID_PREFIX}{sweep_spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    client.submit_job(
        entrypoint=entrypoint("resume" if resume else "run", sweep_spec.name, max_epochs, max_batches, yes),
        submission_id=job_id,
        runtime_env={"env_vars": env_vars},
        metadata={KIND_KEY: "sweep", SWEEP_KEY: sweep_spec.name, "bnew.tracking_uri": job_uri,
                  "bnew.version": local_versions()["bnew-sweep"]},
    )
    typer.echo(f"submitted job {job_id} (sweep {sweep_spec.name})")
    try:
        typer.echo(f"MLflow: {experiment_url(here_uri, sweep_spec.name)}")
    except MlflowException as exc:
        typer.echo(f"MLflow: experiment {sweep_spec.name!r} at {here_uri} (not reachable from here: "
                   f"{str(exc).splitlines()[0][:120]})")
    typer.echo(f"follow: bnew sweep logs {job_id} --follow | status: bnew sweep status {sweep_spec.name} | "
               f"stop: bnew sweep stop {job_id} | all: bnew sweep jobs")
    if follow:
        stream_logs(client, job_id)


def job_info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        fail(f"{job_id}: no such job on the cluster (see `bnew sweep jobs`)")


def jobs(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)) -> None:
    """List this project's sweep jobs on the cluster with their state."""
    from rich.console import Console
    from rich.table import Table

    client = job_client(address)
    ours = [job for job in client.list_jobs() if (job.metadata or {}).get(KIND_KEY) == "sweep"]
    table = Table(title=f"sweep jobs on {api_address(address)}")
    for column in ("job", "sweep", "state", "started", "ended", "message"):
        table.add_column(column, overflow="fold")
    for job in sorted(ours, key=lambda job: job.start_time or 0):
        table.add_row(job.submission_id, job.metadata.get(SWEEP_KEY, ""), job.status.value,
                      clock(job.start_time), clock(job.end_time), (job.message or "").splitlines()[0][:80] if job.message else "")
    Console(width=200).print(table)


def clock(epoch_ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch_ms / 1000)) if epoch_ms else ""


def stream_logs(client: Any, job_id: str) -> None:
    """Print the driver's log as it grows, until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            typer.echo(chunk, nl=False)

    asyncio.run(tail())
    typer.echo(f"job {job_id}: {client.get_job_status(job_id).value}")


def logs(
    job: str = typer.Argument(..., help=JOB_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends."),
) -> None:
    """Print the log of a sweep job's driver (what `bnew sweep run` prints)."""
    client = job_client(address)
    job_info(client, job)
    if follow:
        stream_logs(client, job)
    else:
        typer.echo(client.get_job_logs(job), nl=False)


def stop(
    job: str = typer.Argument(..., help=JOB_HELP),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
) -> None:
    """Stop a sweep job: its driver marks the unfinished trial runs KILLED in MLflow and exits.

    Submitting the same spec again later trains only what is missing."""
    client = job_client(address)
    status = job_info(client, job).status
    if status.is_terminal():
        typer.echo(f"job {job}: already {status.value}")
        return
    client.stop_job(job)
    deadline = time.monotonic() + STOP_WAIT_S + 30
    while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    typer.echo(f"job {job}: {client.get_job_status(job).value}")


def register_submission_commands(sweep_app: typer.Typer) -> None:
    """`bnew sweep submit/jobs/logs/stop`."""
    for command in (submit, jobs, logs, stop):
        sweep_app.command(command.__name__)(command)
