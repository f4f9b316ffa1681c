"""The training loop end to end: determinism, exact resume, checkpoints, distillation, and
every optimiser beating chance by a wide margin on real (digits) data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bnew_core.callbacks import Callback
from bnew_core.config import BnewError, TrialConfig
from bnew_core.train import COMPILE_MIN_STEPS, should_compile, train

TIMING = {"epoch_seconds", "images_per_second"}


def synthetic(tmp: Path, name: str, **fields) -> TrialConfig:
    base = dict(data={"name": "synthetic", "synthetic_size": 256}, batch_size=32, device="cpu",
                output_dir=str(tmp / name), epochs=4)
    base.update(fields)
    return TrialConfig.model_validate(base)


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in history]


class CrashAfter(Callback):
    """Simulates a killed process: raises once the given epoch's checkpoint is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint: Path | None) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("optimiser", [{"name": "bop"}, {"name": "bnew", "lambda_rate": 2.0, "freeze_epochs": 1},
                                       {"name": "bmd", "freeze_epochs": 1}, {"name": "ste"}])
def test_resume_equals_uninterrupted(tmp_path: Path, optimiser: dict) -> None:
    whole = train(synthetic(tmp_path, "whole", phase="quantise", optimiser=optimiser))
    config = synthetic(tmp_path, "split", phase="quantise", optimiser=optimiser)
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[CrashAfter(1)])
    resumed = train(config, resume_from=config.output_dir / "checkpoint.pt")
    assert without_timing(resumed.history) == without_timing(whole.history)
    final_whole = torch.load(whole.model_path, weights_only=True)["model"]
    final_resumed = torch.load(resumed.model_path, weights_only=True)["model"]
    assert all(torch.equal(final_whole[key], final_resumed[key]) for key in final_whole)


def test_resumed_after_its_last_epoch_the_trial_still_has_its_checkpoint(tmp_path: Path) -> None:
    config = synthetic(tmp_path, "ended", phase="pretrain", epochs=1, max_batches=2)
    train(config)
    moved = tmp_path / "restored.pt"  # as Tune restores it: elsewhere, into a new output folder
    (config.output_dir / "checkpoint.pt").rename(moved)
    resumed = train(config, resume_from=moved)
    assert resumed.checkpoint_path.read_bytes() == moved.read_bytes()


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path) -> None:
    runs = [train(synthetic(tmp_path, f"r{i}", phase="pretrain", epochs=2, seed=seed)) for i, seed in enumerate((3, 3, 4))]
    assert without_timing(runs[0].history) == without_timing(runs[1].history)
    assert without_timing(runs[0].history) != without_timing(runs[2].history)


@pytest.mark.long  # ~3 min of compiling on 2 cores
def test_compiled_model_computes_what_the_eager_one_does(tmp_path: Path) -> None:
    """torch.compile (the fast path of long trials) fuses the ops, it does not change the model:
    same logits and gradients (up to float reordering) in training and eval mode, and a compiled
    trial runs end to end. (Whole trials are not compared: sign() makes trajectories chaotic,
    so two numerically equal models drift apart like two seeds.)"""
    from bnew_core.config import ModelConfig
    from bnew_core.models import build_model

    torch.manual_seed(0)
    eager = build_model(ModelConfig(arch="resnet20"), 3, 10)
    twin = build_model(ModelConfig(arch="resnet20"), 3, 10)
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin)
    # The trial below uses these shapes too (batch 32, 32x32x3), so its graphs come from the cache.
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    for model in (eager, compiled):
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    assert torch.allclose(compiled(images), eager(images), atol=1e-4)
    for (name, a), b in zip(eager.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), name
    eager.eval(), compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(images), eager(images), atol=1e-4)

    result = train(synthetic(tmp_path, "compiled", phase="quantise", epochs=2, compile=True, eval_batch_size=32,
                             optimiser={"name": "bnew", "lambda_rate": 2.0, "freeze_epochs": 0}))
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert result.history[-1]["dist_to_binary"] < result.history[0]["dist_to_binary"]  # BNEW's prox at work


def test_compile_by_default_only_for_long_trials(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    short = synthetic(tmp_path, "short", phase="pretrain")
    assert not should_compile(short, COMPILE_MIN_STEPS - 1, cpu)
    assert should_compile(short.model_copy(update={"compile": True}), 10, cpu)
    assert not should_compile(short.model_copy(update={"compile": False}), 10 * COMPILE_MIN_STEPS, cpu)
    # A long trial compiles where the CPU backend's C++ compiler is present (this test machine has one).
    assert should_compile(short, COMPILE_MIN_STEPS, cpu)


def test_checkpoint_contents_load_with_weights_only(tmp_path: Path) -> None:
    result = train(synthetic(tmp_path, "ckpt", phase="quantise", optimiser={"name": "bop"}, epochs=2))
    state = torch.load(result.checkpoint_path, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert set(state) >= {"model", "method", "rng", "config", "history"}
    assert len(state["method"]["extra"]["momentum"]) == 18
    model = torch.load(result.model_path, weights_only=True)
    binary = [v for k, v in model["model"].items() if k.startswith("blocks.") and k.endswith("conv.weight")]
    assert all(set(w.unique().tolist()) <= {-1.0, 1.0} for w in binary)  # saved fully binarised
    metrics = result.final_metrics
    for key in ("loss", "train_acc", "test_acc_float", "test_acc_binary", "dist_to_binary", "flip_fraction",
                "lambda", "lr", "epoch_seconds", "images_per_second"):
        assert key in metrics


def test_corrupted_checkpoint_and_missing_teacher_are_named(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    config = synthetic(tmp_path, "x", phase="quantise", optimiser={"name": "ste"}, epochs=1)
    with pytest.raises(BnewError, match="resume: .*broken.pt is not a readable checkpoint"):
        train(config, resume_from=broken)
    with pytest.raises(BnewError, match="init_checkpoint: .*missing.pt does not exist"):
        train(config.model_copy(update={"init_checkpoint": tmp_path / "missing.pt"}))
    with pytest.raises(BnewError, match="teacher_checkpoint: required"):
        train(config.model_copy(update={"distillation": True}))


def test_distillation_from_a_teacher_and_dataset_mismatch(tmp_path: Path) -> None:
    bigger = {"name": "synthetic", "synthetic_size": 512}
    teacher = train(synthetic(tmp_path, "teacher", phase="teacher", epochs=4, lr=0.05, data=bigger))
    assert teacher.final_metrics["test_acc_float"] > 80  # 10 classes: chance is 10%
    student = train(synthetic(tmp_path, "student", phase="pretrain", epochs=4, distillation=True, data=bigger,
                              teacher_checkpoint=str(teacher.model_path)))
    assert student.final_metrics["test_acc_float"] > 50
    other = TrialConfig(phase="pretrain", epochs=1, device="cpu", distillation=True,
                        teacher_checkpoint=teacher.model_path, output_dir=tmp_path / "digits")
    with pytest.raises(BnewError, match="was trained on synthetic"):
        train(other)


def test_every_optimiser_binarises_digits_above_80_percent(tmp_path: Path) -> None:
    """Real data: pretrain, then each optimiser for 15 epochs; chance is 10%."""
    common = dict(epochs=15, batch_size=64, device="cpu")
    pretrained = train(TrialConfig(phase="pretrain", output_dir=tmp_path / "pretrain", **common))
    optimisers = [{"name": "ste"}, {"name": "bmd", "freeze_epochs": 2}, {"name": "bop", "gamma": 1e-3},
                  {"name": "bnew", "lambda_rate": 5.0, "freeze_epochs": 2}]
    accuracies = {}
    for optimiser in optimisers:
        result = train(TrialConfig(phase="quantise", optimiser=optimiser, init_checkpoint=pretrained.model_path,
                                   output_dir=tmp_path / optimiser["name"], **common))
        accuracies[optimiser["name"]] = result.final_metrics["test_acc_binary"]
    assert min(accuracies.values()) >= 80.0, accuracies
