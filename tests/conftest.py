"""Settings for every test process and the servers the tests start, and the Debian packages
some tests need (marker `debian`)."""

import os

import pytest

from servers import debian_missing

# MLflow 3's server starts a pool of job-runner processes (GenAI jobs, ~1 GB) that no test
# uses; the servers the tests start (directly or through cluster/start_local.sh) inherit this.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
# Ray starts its workers, and so the trials, at nice 15. Beside other work at nice 0 (a busy CI
# host, bench/loaded_suite.sh's busy loops) a trial then gets about 3% of a core and the suite's
# sweeps take hours; at nice 0 the load slows every process of the suite alike.
os.environ.setdefault("RAY_worker_niceness", "0")


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures start servers or sweeps
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked `debian("chromium")` skips in one line naming what to install when the
    package is missing; under CI (CI=true), which installs them (.ci/run), it fails instead, so
    CI never passes without running it."""
    message = debian_missing(*(package for mark in item.iter_markers("debian") for package in mark.args))
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
