"""Will a sweep's trials ever be scheduled (sweeps/run/resources.py), on a real loopback Ray cluster:
a head with 1 CPU and no GPU, then a worker with 2 CPUs and 2 logical GPUs (Ray hands out GPU ids
and sets CUDA_VISIBLE_DEVICES without any hardware). Also what a 0.25-GPU trial sees there, and
`bnew sweep run` on this machine without GPUs: a GPU trial refused in one line, or waited for with
--wait-for-resources, and a device that cannot be had refused before anything starts."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from mlflow import MlflowClient

from bnew_core.config import BnewError
from sweeps.run.resources import check_trials_fit, largest_node_fit
from tests.ray_nodes import LoopbackCluster, listening, wait_for
from tests.servers import sweep_env

pytestmark = pytest.mark.slow


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [node for node in ray.nodes() if node["Alive"]]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    """The head alone, connected; `worker_node` adds the worker."""
    import ray

    cluster = LoopbackCluster()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("RAY_AUTH_MODE", "disabled")  # this driver too
            cluster.start_head()
            wait_for(lambda: listening(cluster.port), "the head's GCS")
            ray.init(address=f"127.0.0.1:{cluster.port}", logging_level="ERROR", log_to_driver=False)
            yield cluster
    finally:
        ray.shutdown()
        cluster.stop()


@pytest.fixture(scope="module")
def worker_node(cluster: LoopbackCluster) -> dict[str, Any]:
    cluster.start_worker()
    wait_for(lambda: len(alive_nodes()) == 2, "the worker node")
    return next(node for node in alive_nodes() if node["Resources"].get("GPU"))


# The head-only test comes first: the worker node joins the cluster for the tests after it.
def test_a_cluster_without_gpus_holds_no_gpu_trial(cluster: LoopbackCluster) -> None:
    import ray

    assert len(alive_nodes()) == 1, "runs before the worker node joins"
    problem = largest_node_fit(ray.nodes(), {"gpu": 0.25})
    assert problem == ("resources.gpu: a trial needs 0.25 GPU on one node, but the largest node has 0 GPUs; "
                       "fix: a cluster with GPUs, or resources.gpu: 0")
    with pytest.raises(BnewError, match=r"^resources\.gpu: a trial needs 0\.25 GPU on one node, but the largest "
                                        r"node with 1 CPU has 0 GPUs"):
        check_trials_fit({"cpu": 1, "gpu": 0.25})
    assert check_trials_fit({"cpu": 1}) is None


def test_a_trial_fits_only_where_one_node_holds_all_of_it(worker_node: dict[str, Any]) -> None:
    assert check_trials_fit({"cpu": 1, "gpu": 0.25}) is None  # on the worker: the head has no GPU
    # The cluster has 3 CPUs and 2 GPUs in sum, but no node 4 CPUs beside a GPU: that would wait forever.
    with pytest.raises(BnewError) as cpu:
        check_trials_fit({"cpu": 4, "gpu": 0.25})
    assert str(cpu.value) == ("resources.cpu: a trial needs 4 CPUs on one node, but the largest node with 0.25 GPU "
                              "has 2 CPUs; fix: resources.cpu: at most 2, or nodes with more")
    with pytest.raises(BnewError, match=r"^resources\.gpu: a trial needs 3 GPUs on one node, but the largest node "
                                        r"with 1 CPU has 2 GPUs; fix: resources\.gpu: at most 2"):
        check_trials_fit({"cpu": 1, "gpu": 3})
    memory = worker_node["Resources"]["memory"]
    with pytest.raises(BnewError, match=r"^resources\.memory: "):
        check_trials_fit({"cpu": 1, "gpu": 0.25, "memory": 2 * memory})
    # A cluster said to grow: the same shortfall is the line printed while Tune waits, not an error.
    assert check_trials_fit({"cpu": 4, "gpu": 0.25}, autoscaling=True) == (
        str(cpu.value) + "; waiting for such a node to join the cluster")


def test_node_types_an_autoscaler_reports_count_as_nodes_to_come(worker_node: dict[str, Any]) -> None:
    """Ray's v2 autoscaler reports the node types it can add to the GCS (after Ray 2.60; 2.60's
    autoscalers report nothing). This test reports them the way the autoscaler does, to the real GCS."""
    import ray
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    report = ray._private.worker.global_worker.gcs_client.report_cluster_config
    try:
        report(ClusterConfig(node_group_configs=[
            NodeGroupConfig(name="gpu-8", resources={"CPU": 8, "GPU": 1}, max_count=2)]).SerializeToString())
        waiting = check_trials_fit({"cpu": 4, "gpu": 0.25})
        assert waiting.endswith("; waiting for the autoscaler to add a node that holds it")
        report(ClusterConfig(node_group_configs=[  # the type is there, but none may be added
            NodeGroupConfig(name="gpu-8", resources={"CPU": 8, "GPU": 1}, max_count=0)]).SerializeToString())
        with pytest.raises(BnewError, match=r"^resources\.cpu: "):
            check_trials_fit({"cpu": 4, "gpu": 0.25})
    finally:
        report(ClusterConfig().SerializeToString())  # reads back as "none reported"
    with pytest.raises(BnewError):
        check_trials_fit({"cpu": 4, "gpu": 0.25})


def test_a_quarter_gpu_trial_sees_one_gpu_of_its_own(worker_node: dict[str, Any]) -> None:
    """What the sweep's 0.25-GPU trials see: Ray gives each its one GPU id in CUDA_VISIBLE_DEVICES,
    four trials to a GPU at once, the ninth waits; and a trial asking for no GPU sees the node's
    CUDA_VISIBLE_DEVICES untouched (Ray no longer sets it empty, ray-project/ray#54868), so on a GPU
    node `device: auto` would take GPU 0 without having reserved it: a sweep's trial hides them first."""
    import ray

    @ray.remote(num_gpus=0.25, num_cpus=0)
    class Trial:
        def sees(self) -> tuple[list[str], str | None, str]:
            return ([str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES"),
                    ray.get_runtime_context().get_node_id())

        def device(self) -> dict[str, str]:
            from bnew_core.device import choose_device, observe_cuda

            return choose_device("auto", observe_cuda()).record()

    @ray.remote(num_gpus=0, num_cpus=0)
    def cpu_trial_sees() -> tuple[str, str]:
        from sweeps.run.trial import hide_unreserved_gpus

        given = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        hide_unreserved_gpus()
        return given, os.environ["CUDA_VISIBLE_DEVICES"]

    trials = [Trial.remote() for _ in range(8)]  # actors hold their quarter GPU while they live
    seen = ray.get([trial.sees.remote() for trial in trials], timeout=120)
    assert all(gpu_ids == [visible] for gpu_ids, visible, _ in seen)  # one id, the same in both places
    assert collections.Counter(visible for _, visible, _ in seen) == {"0": 4, "1": 4}
    assert {node for _, _, node in seen} == {worker_node["NodeID"]}
    ninth = Trial.remote()
    ready, _ = ray.wait([ninth.sees.remote()], timeout=2)
    assert not ready  # both GPUs are taken four times over
    ray.kill(trials[0])
    assert ray.get(ninth.sees.remote(), timeout=60)[1] == seen[0][1]  # the freed quarter
    # The trainer in such a trial, on this machine without CUDA: logical GPU "0", so auto says why it is on the CPU.
    assert ray.get(trials[1].device.remote(), timeout=120) == {
        "device": "cpu", "gpu_ids": seen[1][1],
        "device_fallback": f"auto: no CUDA device visible (CUDA_VISIBLE_DEVICES='{seen[1][1]}')"}
    assert ray.get(cpu_trial_sees.remote(), timeout=60) == ("unset", "")
    for trial in [*trials[1:], ninth]:
        ray.kill(trial)


# --- the command line: refused before any trial starts, or waiting for a node ----------------------
QUIET = ("ERROR", "Traceback", "Failed to connect to GCS")
"""What the refusal and the wait never print (Ray's and Tune's errors when a driver goes away)."""


def gpu_spec(directory: Path, **settings: Any) -> Path:
    """One STE trial on digits (no prerequisites) that asks for a quarter of a GPU."""
    spec = {"name": "quarter-gpu", "axes": {"dataset": ["digits"], "optimiser": ["ste"], "ablation": ["no_pretrain"],
                                            "seed": [0], "budget": [1]},
            "base": {"batch_size": 64}, "resources": {"cpu": 1, "gpu": 0.25}, **settings}
    path = directory / "quarter-gpu.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def bnew(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, env=sweep_env(),
                          capture_output=True, text=True, timeout=300)


def test_a_gpu_trial_on_a_machine_without_gpus_is_refused_in_one_line(tmp_path: Path) -> None:
    """Refused once Ray says what its node holds, before the estimate and before any trial: the
    parent run has no `bnew.estimate`, there is no trial run and no Tune experiment."""
    result = bnew("sweep", "run", str(gpu_spec(tmp_path)), "--local", cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr == ("error: resources.gpu: a trial needs 0.25 GPU on one node, but the largest node with 1 CPU "
                             "has 0 GPUs; fix: a cluster with GPUs, or resources.gpu: 0\n")
    assert not any(word in result.stdout + result.stderr for word in QUIET), result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / '.bnew' / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("quarter-gpu").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.`bnew.role` = 'sweep'")
    assert "bnew.estimate" not in parent.data.tags
    assert client.search_runs([experiment_id], "tags.`bnew.role` = 'trial'") == []
    assert not (tmp_path / ".bnew" / "ray_results" / "quarter-gpu").exists()


@pytest.mark.parametrize("settings, flag, says", [
    ({"base": {"batch_size": 64, "device": "cuda"}}, "--debug", "error: device: cuda requested but "),
    ({"base": {"batch_size": 64, "device": "cuda"}, "resources": {"cpu": 1}}, "--local",
     "error: device: cuda needs a GPU reserved for each trial, but resources.gpu is 0"),
])
def test_a_device_that_cannot_be_had_is_refused_before_anything_runs(
        tmp_path: Path, settings: dict[str, Any], flag: str, says: str) -> None:
    """`--debug` trains in this process, which has no CUDA here; on Ray a trial sees only the GPUs
    it reserved. Both before MLflow or Ray start."""
    result = bnew("sweep", "run", str(gpu_spec(tmp_path, **settings)), flag, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(says) and result.stderr.count("\n") == 1, result.stderr
    assert "Ray:" not in result.stdout and not (tmp_path / ".bnew" / "mlflow.db").exists()


def test_waiting_for_a_gpu_node_says_so_once_and_stops_cleanly(tmp_path: Path) -> None:
    """With --wait-for-resources the sweep waits (for a node an autoscaler would add) with one line
    of its own instead of Tune's warning, here made to come every second; SIGTERM (`ray job stop`)
    ends the wait without an error."""
    env = sweep_env(TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S="1",
                    TUNE_WARN_INSUFFICENT_RESOURCE_THRESHOLD_S_AUTOSCALER="1")
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        driver = subprocess.Popen([sys.executable, "-m", "sweeps.cli", "sweep", "run", str(gpu_spec(tmp_path)),
                                   "--local", "--wait-for-resources"], cwd=tmp_path, env=env, stdout=stdout, stderr=stderr)
    try:
        wait_for(lambda: "waiting for such a node" in out.read_text() or driver.poll() is not None,
                 "the waiting line", timeout=180)
        time.sleep(8)  # several of Tune's warning periods
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    printed = out.read_text() + err.read_text()
    assert driver.returncode == 130, printed[-3000:]
    waiting = [line for line in printed.splitlines() if "waiting for such a node" in line]
    assert waiting == ["resources.gpu: a trial needs 0.25 GPU on one node, but the largest node with 1 CPU has 0 GPUs; "
                       "fix: a cluster with GPUs, or resources.gpu: 0; waiting for such a node to join the cluster"]
    assert "Ignore this message if the cluster is autoscaling" not in printed
    assert not any(word in printed for word in QUIET), printed[-3000:]


def test_a_submitted_sweep_waits_when_asked_to() -> None:
    """`submit --wait-for-resources`: the job's driver (`bnew sweep run` on the cluster) gets the flag."""
    from sweeps.run.jobs import entrypoint

    assert entrypoint("run", "big", None, None, wait_for_resources=True).endswith('big.yaml --wait-for-resources')
    assert "--wait-for-resources" not in entrypoint("resume", "big", None, None)
