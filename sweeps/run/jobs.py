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
from typing import Any, Callable

import ray
from ray.job_submission import JobDetails, JobSubmissionClient

from bnew_core.config import BnewError
from sweeps.core.addresses import check_tracking_reaches, is_local
from sweeps.core.spec import SweepSpec, dump_spec

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

Log = Callable[[str], None]


def api_address(address: str | None) -> str:
    """The Jobs API address: the option, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    resolved = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not resolved:
        raise BnewError("--address: give the cluster's Jobs API (http://HEAD:8265) or set RAY_API_SERVER_ADDRESS")
    if address:
        # Ray's client prefers the environment over its argument; the option must win here.
        os.environ["RAY_API_SERVER_ADDRESS"] = address
    return resolved


def job_client(address: str | None) -> JobSubmissionClient:
    """A JobSubmissionClient for the cluster, or a one-line error if it cannot be reached."""
    logging.getLogger("ray.dashboard").setLevel(logging.WARNING)  # no INFO line per request
    resolved = api_address(address)
    try:
        return JobSubmissionClient(resolved)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BnewError(f"--address: the Ray Jobs API at {resolved} did not answer ({first[:200]}); "
                        "with token auth set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH") from None


def local_versions() -> dict[str, str]:
    return {"ray": ray.__version__, "bnew-sweep": importlib.metadata.version("bnew-sweep")}


def cluster_versions(client: JobSubmissionClient) -> dict[str, str]:
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


def check_versions(client: JobSubmissionClient, warn: Log) -> None:
    """Warn in one line when the cluster's Ray or bnew-sweep differs from this machine's."""
    try:
        mismatch = version_mismatch(local_versions(), cluster_versions(client))
    except Exception as exc:  # the check is advice; the sweep itself may still run
        warn(f"warning: could not read the cluster's versions ({type(exc).__name__}: "
             f"{str(exc).splitlines()[0][:160] if str(exc) else ''})")
        return
    if mismatch:
        warn(mismatch)


def entrypoint(command: str, sweep: str, max_epochs: int | None, max_batches: int | None, yes: bool = False,
               wait_for_resources: bool = False) -> str:
    """The driver's shell command on the cluster: the spec from `SPEC_ENV` into a file, then
    `bnew sweep run` (or `resume`) on it, exec'd so that `stop`'s SIGTERM reaches the driver."""
    parts = ["bnew", "sweep", command, f'"$spec_dir"/{shlex.quote(sweep)}.yaml']
    for option, value in (("--max-epochs", max_epochs), ("--max-batches", max_batches)):
        if value is not None:
            parts += [option, str(value)]
    if yes:  # confirmed here, where the size limit was checked
        parts.append("--yes")
    if wait_for_resources:  # the driver checks the cluster's nodes there, once Ray connects
        parts.append("--wait-for-resources")
    return (f'spec_dir=$(mktemp -d) && printenv {SPEC_ENV} >"$spec_dir"/{shlex.quote(sweep)}.yaml && '
            f'exec {" ".join(parts)}')


def cluster_tracking_uri(here: str, given: str | None, address: str) -> str:
    """The tracking URI the job's nodes use: `--tracking-uri`, else the one used here. Never a
    store on this machine (the job's driver logs from the cluster), and never this machine's
    loopback when the cluster is another (the rule `run` applies to its trials)."""
    uri = given or here
    if is_local(uri):
        raise BnewError(f"{'--tracking-uri' if given else 'tracking_uri'}: {uri} is a store on this machine; a "
                        "submitted sweep logs from the cluster, so set MLFLOW_TRACKING_URI (or the spec's "
                        "tracking_uri) to its MLflow server")
    check_tracking_reaches(uri, address, "--tracking-uri")  # the option is how to name another address
    return uri


def submit_sweep(client: JobSubmissionClient, spec: SweepSpec, job_uri: str, command: str,
                 max_epochs: int | None, max_batches: int | None, yes: bool, data_dir: str | None,
                 wait_for_resources: bool) -> str:
    """Submit the sweep's driver as a Ray job; returns its id. The spec travels in the job's
    environment, with the tracking URI as the nodes reach it."""
    job_spec = spec.model_copy(update={"tracking_uri": job_uri}) if spec.tracking_uri else spec
    env_vars = {SPEC_ENV: dump_spec(job_spec), "MLFLOW_TRACKING_URI": job_uri,
                "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S), "PYTHONUNBUFFERED": "1"}
    if data_dir:
        env_vars["BNEW_DATA_DIR"] = data_dir
    job_id = f"{JOB_ID_PREFIX}{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    client.submit_job(
        entrypoint=entrypoint(command, spec.name, max_epochs, max_batches, yes, wait_for_resources),
        submission_id=job_id,
        runtime_env={"env_vars": env_vars},
        metadata={KIND_KEY: "sweep", SWEEP_KEY: spec.name, "bnew.tracking_uri": job_uri,
                  "bnew.version": local_versions()["bnew-sweep"]},
    )
    return job_id


def job_info(client: JobSubmissionClient, job_id: str) -> JobDetails:
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        raise BnewError(f"{job_id}: no such job on the cluster (see `bnew sweep jobs`)") from None


def sweep_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """This project's sweep jobs on the cluster, oldest first."""
    ours = [job for job in client.list_jobs() if (job.metadata or {}).get(KIND_KEY) == "sweep"]
    return sorted(ours, key=lambda job: job.start_time or 0)


def stream_logs(client: JobSubmissionClient, job_id: str, echo: Log) -> None:
    """Print the driver's log as it grows, until the job ends."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            echo(chunk)

    asyncio.run(tail())


def stop_job(client: JobSubmissionClient, job_id: str) -> str:
    """Stop the job (its driver marks its unfinished runs KILLED) and wait for it to end; its final state."""
    status = job_info(client, job_id).status
    if status.is_terminal():
        return f"already {status.value}"
    client.stop_job(job_id)
    deadline = time.monotonic() + STOP_WAIT_S + 30
    while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
        time.sleep(1)
    return client.get_job_status(job_id).value
