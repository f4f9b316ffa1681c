"""Which device a trial trains on (bnew_core.device): the decision for every case, then the
trainer for real, in a process that sees no GPU the way a Ray trial without one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bnew_core.callbacks import Callback
from bnew_core.config import BnewError, TrialConfig
from bnew_core.device import CudaView, choose_device
from bnew_core.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("requested, view, device, fallback", [
    ("cpu", CudaView(2, "0,1"), "cpu", None),
    ("auto", CudaView(1, "3"), "cuda:0", None),  # a Ray trial's one GPU is its cuda:0, whatever its id
    ("cuda", CudaView(1, None), "cuda:0", None),
    ("cuda:1", CudaView(2, "4,5"), "cuda:1", None),
    ("auto", CudaView(0, None), "cpu", "auto: no CUDA device visible (CUDA_VISIBLE_DEVICES unset)"),
    ("auto", CudaView(0, ""), "cpu", "auto: no CUDA device visible (CUDA_VISIBLE_DEVICES='')"),
    ("auto", CudaView(0, "0"), "cpu", "auto: no CUDA device visible (CUDA_VISIBLE_DEVICES='0')"),  # Ray's logical GPU
    ("auto", CudaView(0, None, built=False), "cpu", f"auto: torch {torch.__version__} is built without CUDA"),
])
def test_each_request_resolves_to_a_device_and_says_why_when_it_falls_back(
        requested: str, view: CudaView, device: str, fallback: str | None) -> None:
    choice = choose_device(requested, view)
    assert (str(choice.device), choice.fallback) == (device, fallback)
    assert choice.record()["device"] == device and choice.record().get("device_fallback") == fallback


@pytest.mark.parametrize("requested, view, says", [
    ("cuda", CudaView(0, ""), "no CUDA device visible (CUDA_VISIBLE_DEVICES='')"),
    ("cuda:0", CudaView(0, None, built=False), "built without CUDA"),
    ("cuda:1", CudaView(1, "2"), "only 1 CUDA device(s) visible (CUDA_VISIBLE_DEVICES='2'); use cuda:0 to cuda:0"),
    ("mps", CudaView(1, None), "is not a device (auto, cpu, cuda, cuda:N)"),
])
def test_a_device_that_cannot_be_had_is_one_line_naming_device(requested: str, view: CudaView, says: str) -> None:
    with pytest.raises(BnewError) as error:
        choose_device(requested, view)
    message = str(error.value)
    assert message.startswith("device: ") and says in message and "\n" not in message


class SeesDevice(Callback):
    """What a callback (the sweep's MLflow logger) learns when training starts."""

    def __init__(self) -> None:
        self.seen: dict[str, str] | None = None

    def on_train_start(self, config: Any, start_epoch: int, batches_per_epoch: int) -> None:
        self.seen = config.device_choice.record()


def tiny(output_dir: Path, **fields: Any) -> TrialConfig:
    return TrialConfig.model_validate({"data": {"name": "synthetic", "synthetic_size": 64}, "phase": "pretrain",
                                       "batch_size": 32, "epochs": 1, "output_dir": str(output_dir), **fields})


# CUDA reads CUDA_VISIBLE_DEVICES once, when it starts, so hiding the GPUs of a GPU machine takes a
# fresh process; it is also what a Ray trial without a GPU sees when its node sets it empty.
NO_GPU_SCRIPT = """
import json, sys
from pathlib import Path
from bnew_core.config import BnewError, TrialConfig
from bnew_core.train import train
from tests.test_device import SeesDevice, tiny

out = Path(sys.argv[1])
# imagefolder without its folders: had the data loaded first, this would fail on data.root.
cuda = TrialConfig.model_validate({"data": {"name": "imagefolder", "root": str(out / "nothing")}, "phase": "pretrain",
                                   "device": "cuda", "output_dir": str(out / "cuda")})
try:
    train(cuda)
    error = None
except BnewError as exc:
    error = str(exc)
print("RESULT-LINE-FOLLOWS", flush=True)
sees = SeesDevice()
result = train(tiny(out / "auto", device="auto"), callbacks=[sees])
print(json.dumps({"error": error, "cuda_wrote": (out / "cuda").exists(), "seen": sees.seen,
                  "result": result.extra["device"].record()}))
"""


@pytest.fixture(scope="module")
def without_a_gpu(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[str]]:
    """A `cuda` trial and an `auto` trial in one process that sees no GPU: (what they report,
    the lines the auto trial printed)."""
    out = tmp_path_factory.mktemp("no_gpu")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", NO_GPU_SCRIPT, str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    printed = run.stdout.split("RESULT-LINE-FOLLOWS\n", 1)[1].splitlines()
    return json.loads(printed[-1]), printed[:-1]


def test_cuda_without_a_gpu_fails_at_once_naming_device(without_a_gpu: tuple[dict, list[str]]) -> None:
    report, _ = without_a_gpu
    assert report["error"] == (
        "device: cuda requested but no CUDA device visible (CUDA_VISIBLE_DEVICES=''); use device: auto "
        "(the CPU when no GPU is there) or cpu, or run the trial where a GPU is visible")
    assert not report["cuda_wrote"]  # before the data (its error would name data.root), the model, anything


def test_auto_without_a_gpu_trains_on_the_cpu_and_says_why(without_a_gpu: tuple[dict, list[str]]) -> None:
    report, printed = without_a_gpu
    reason = "auto: no CUDA device visible (CUDA_VISIBLE_DEVICES='')"
    expected = {"device": "cpu", "gpu_ids": "", "device_fallback": reason}
    assert report["seen"] == expected and report["result"] == expected  # at the start and in the result
    assert [line for line in printed if line.startswith("device:")] == [f"device: {reason}; training on the CPU"]


def test_cpu_trains_on_the_cpu_with_no_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, sees = tiny(tmp_path / "cpu", device="cpu"), SeesDevice()
    result = train(config, callbacks=[sees])
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    assert sees.seen == result.extra["device"].record() == {"device": "cpu", "gpu_ids": visible}
    assert "device:" not in capsys.readouterr().out
    # The choice rides on the callbacks' copy: the caller's config and the dumped one stay as they were.
    assert config.device_choice is None and "choice" not in (config.output_dir / "config.yaml").read_text()
