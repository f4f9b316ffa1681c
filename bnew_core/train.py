"""The training loop: one function, one obvious loop.

    train(config, callbacks, resume_from) -> TrialResult

It loads the data onto the device, builds the model and the weight method of the phase,
optionally a teacher and starting weights, then runs the epochs: augmented batches,
forward (with bf16 autocast on GPUs), loss (cross-entropy or distillation), backward,
method step; per epoch it evaluates the float and the fully binarised network, writes a
checkpoint and hands the metrics to the callbacks.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .callbacks import Callback, Metrics, TrialResult
from .checkpoint import CHECKPOINT_FORMAT, MODEL_FORMAT, load_file, rng_state, save_atomic, set_rng_state, write_checksum
from .config import BnewError, TrialConfig, build_trial_config, dump_trial_config
from .data import BatchLoader, ImageData, Split, eval_batches, load_data
from .device import DeviceChoice, choose_device, observe_cuda, resolve_device  # noqa: F401 (bench imports it here)
from .models import build_model
from .optimisers import WeightMethod, build_method


class DivergedError(BnewError):
    """The loss became NaN or infinite: training cannot recover, and a retry would do the same."""


COMPILE_MIN_STEPS = 2000


def should_compile(config: TrialConfig, steps: int, device: torch.device) -> bool:
    """`config.compile`, or when unset: a long enough trial on a device inductor can compile for."""
    if config.compile is not None:
        return config.compile
    if steps < COMPILE_MIN_STEPS:
        return False
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return device.type == "cpu" and any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def checkpoint_due(config: TrialConfig, epoch: int, last_checkpoint: float) -> bool:
    """After the last epoch, every `checkpoint_every` epochs, or once `checkpoint_minutes` have
    passed since `last_checkpoint` (a `time.monotonic()` value), whichever comes first."""
    if epoch + 1 == config.epochs or (epoch + 1) % config.checkpoint_every == 0:
        return True
    minutes = config.checkpoint_minutes
    return minutes is not None and time.monotonic() - last_checkpoint >= minutes * 60


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_teacher(config: TrialConfig, data: ImageData, device: torch.device) -> nn.Module:
    """The distillation teacher, in eval mode, checked against this trial's dataset."""
    if config.teacher_checkpoint is None:
        raise BnewError("teacher_checkpoint: required when distillation is on")
    saved = load_file(config.teacher_checkpoint, MODEL_FORMAT, "teacher_checkpoint")
    teacher_config = build_trial_config(saved["config"], str(config.teacher_checkpoint))
    if teacher_config.data.name != config.data.name or saved["num_classes"] != data.num_classes:
        raise BnewError(
            f"teacher_checkpoint: {config.teacher_checkpoint} was trained on {teacher_config.data.name} "
            f"({saved['num_classes']} classes), this trial uses {config.data.name} ({data.num_classes})"
        )
    teacher = build_model(teacher_config.model, data.in_channels, data.num_classes)
    teacher.load_state_dict(saved["model"])
    return teacher.to(device).eval().requires_grad_(False)


def load_initial_weights(model: nn.Module, path: Path) -> None:
    saved = load_file(path, MODEL_FORMAT, "init_checkpoint")
    missing, unexpected = model.load_state_dict(saved["model"], strict=False)
    if missing or unexpected:
        raise BnewError(
            f"init_checkpoint: {path} does not fit this architecture "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the student's log-softmax and the teacher's softmax (no temperature)."""
    return -(F.softmax(teacher_logits.float(), dim=1) * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, loader: BatchLoader, batch_size: int) -> torch.Tensor:
    """Top-1 accuracy in % as a device tensor (no host sync here).

    Always in float32, also inside the training's bf16 autocast: bf16 would round the conv sums
    and the logits that every reported accuracy comes from."""
    model.eval()
    correct = torch.zeros((), device=split.labels.device)
    with torch.autocast(split.labels.device.type, enabled=False):
        for images, labels in eval_batches(split, loader, batch_size):
            correct += (model(images).argmax(1) == labels).sum()
    model.train()
    return correct * (100.0 / len(split))


def accuracy_on_test_split(model: nn.Module, config: TrialConfig) -> float:
    """Top-1 accuracy in % of a trained `model` (a trial's `model.pt`, or the network
    `mlflow.pytorch.load_model` returns) on the trial's test split, normalised as in its training."""
    data = load_data(config.data)
    loader = BatchLoader(data.train, data, config.data, config.batch_size, config.seed)
    with torch.no_grad():
        return float(accuracy(model, data.test, loader, config.eval_batch_size))


def with_device_choice(config: TrialConfig, choice: DeviceChoice) -> TrialConfig:
    """A copy of `config` that tells the callbacks what it trains on (`config.device_choice`);
    the caller's config stays as it was."""
    copy = config.model_copy()
    copy._device_choice = choice
    return copy


def train(config: TrialConfig, callbacks: Sequence[Callback] = (), resume_from: Path | None = None) -> TrialResult:
    """Run one trial to the end (or continue it from `resume_from`) and return its result."""
    choice = choose_device(config.device, observe_cuda())  # first: a device error must not wait for the data
    device = choice.device
    if choice.fallback:
        print(f"device: {choice.fallback}; training on the CPU", flush=True)
    config = with_device_choice(config, choice)
    seed_everything(config.seed)
    data = load_data(config.data).to(device)
    model = build_model(config.model, data.in_channels, data.num_classes).to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    teacher = load_teacher(config, data, device) if config.distillation else None
    if config.init_checkpoint is not None and resume_from is None:
        load_initial_weights(model, config.init_checkpoint)
    loader = BatchLoader(data.train, data, config.data, config.batch_size, config.seed,
                         config.max_batches, channels_last)
    method: WeightMethod = build_method(model, config, len(loader))
    use_bf16 = config.bf16 and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    compiled = should_compile(config, len(loader) * config.epochs, device)
    forward = torch.compile(model) if compiled else model
    if teacher is not None and compiled:
        teacher = torch.compile(teacher)

    output_dir = config.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(dump_trial_config(config))
    checkpoint_path = output_dir / "checkpoint.pt"
    history: list[Metrics] = []
    start_epoch = 0
    if resume_from is not None:
        state = load_file(resume_from, CHECKPOINT_FORMAT, "resume")
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
        if resume_from.resolve() != checkpoint_path.resolve():
            # The trial's checkpoint until it writes the next; its only one if no epoch is left.
            shutil.copyfile(resume_from, checkpoint_path)
            write_checksum(checkpoint_path)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    for callback in callbacks:
        callback.on_train_start(config, start_epoch, len(loader))

    last_checkpoint = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        method.start_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        started = time.perf_counter()
        for batch, (images, labels) in enumerate(loader.epoch(epoch)):
            method.before_forward()
            with autocast():
                logits = forward(images)
                if teacher is not None:
                    loss = distillation_loss(logits, teacher(images))
                else:
                    loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            method.after_backward()
            method.step()
            loss_sum += loss.detach()
            correct += (logits.detach().argmax(1) == labels).sum()
            for callback in callbacks:
                callback.on_batch_end(epoch, batch, len(loader))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started

        weight_stats = method.end_epoch(epoch)
        with method.training_view():
            test_float = accuracy(forward, data.test, loader, config.eval_batch_size)
        with method.binarised():
            # A network without binary weights (teacher, real-valued) is the same network binarised.
            test_binary = (accuracy(forward, data.test, loader, config.eval_batch_size)
                           if method.binary else test_float)
            val_binary = (accuracy(forward, data.val, loader, config.eval_batch_size)
                          if data.val is not None else None)
        device_values = {
            "loss": loss_sum / len(loader),
            "train_acc": correct * (100.0 / (len(loader) * config.batch_size)),
            "test_acc_float": test_float,
            "test_acc_binary": test_binary,
            **({"val_acc_binary": val_binary} if val_binary is not None else {}),
            **weight_stats,
        }
        metrics: Metrics = {"epoch": float(epoch)}
        metrics.update({key: float(value) for key, value in device_values.items()})  # the one sync
        if not math.isfinite(metrics["loss"]):
            raise DivergedError(f"loss: {metrics['loss']} in epoch {epoch}, the trial diverged (lr {config.lr:g})")
        metrics.update(method.extra_metrics())
        metrics.update({
            "lr": config.lr * method.lr_factor(),
            "epoch_seconds": seconds,
            "images_per_second": len(loader) * config.batch_size / seconds,
        })
        history.append(metrics)
        with open(output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")

        written = None
        if checkpoint_due(config, epoch, last_checkpoint):
            last_checkpoint = time.monotonic()
            written = save_atomic({
                "format": CHECKPOINT_FORMAT,
                "config": config.model_dump(mode="json"),
                "epoch": epoch,
                "model": model.state_dict(),
                "method": method.state_dict(),
                "rng": rng_state(),
                "history": history,
            }, checkpoint_path)
            write_checksum(written)
        for callback in callbacks:
            callback.on_epoch_end(epoch, metrics, written)

    with method.final_weights():
        model_path = save_atomic({
            "format": MODEL_FORMAT,
            "config": config.model_dump(mode="json"),
            "model": model.state_dict(),
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "metrics": history[-1],
        }, output_dir / "model.pt")
    result = TrialResult(history[-1], history, model_path, checkpoint_path, output_dir, extra={"device": choice})
    for callback in callbacks:
        callback.on_train_end(result)
    return result
