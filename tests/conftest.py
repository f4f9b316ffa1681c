"""Settings for every test process and the servers the tests start."""

import os

# MLflow 3's server starts a pool of job-runner processes (GenAI jobs, ~1 GB) that no test
# uses; the servers the tests start (directly or through cluster/start_local.sh) inherit this.
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
