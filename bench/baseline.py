"""The plain baseline trainer the bench compares against: how a typical research script trains.

torchvision `ImageFolder` + `DataLoader(num_workers=2, shuffle=True)` with per-image PIL
transforms, eager fp32, a `.item()` per step. The model (`BinaryResNet20`) and the weight
method (`bnew_core.optimisers`) are the trainer's own, so only the pipeline differs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from bnew_core.config import TrialConfig
from bnew_core.models import build_model
from bnew_core.optimisers import build_method


def image_folders(root: Path, val_size: int, split_seed: int, transform_train, transform_test):
    """Train (minus the validation split, chosen as `bnew_core.data.load_data` does) and test sets."""
    from torchvision import datasets

    train = datasets.ImageFolder(str(root / "train"), transform_train)
    test = datasets.ImageFolder(str(root / "test"), transform_test)
    if val_size:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
        train = Subset(train, order[val_size:].sort().values.tolist())
    return train, test, len(test.classes)


def run(config: TrialConfig, num_workers: int = 2) -> dict[str, float]:
    """Train `config` (imagefolder data) the plain way, evaluating the float and binary nets after each
    epoch; the figures are the last epoch's (the first also carries the DataLoader start-up)."""
    from torchvision import transforms

    torch.manual_seed(config.seed)
    device = torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")
    # Normalisation constants computed once, as research scripts hard-code them (CIFAR-10's).
    normalise = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(), normalise])
    train_set, test_set, num_classes = image_folders(
        config.data.root, config.data.val_size, config.data.split_seed, augment,
        transforms.Compose([transforms.ToTensor(), normalise]))
    pin = device.type == "cuda"
    train_loader = DataLoader(train_set, config.batch_size, shuffle=True, num_workers=num_workers,
                              drop_last=True, pin_memory=pin)
    test_loader = DataLoader(test_set, config.eval_batch_size, num_workers=num_workers, pin_memory=pin)
    model = build_model(config.model, 3, num_classes).to(device)
    batches = min(len(train_loader), config.max_batches or len(train_loader))
    method = build_method(model, config, batches)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def accuracy() -> float:
        model.eval()
        correct = 0
        for images, labels in test_loader:
            correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        model.train()
        return 100.0 * correct / len(test_set)

    epoch_seconds = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        method.start_epoch(epoch)
        model.train()
        loss_sum = 0.0
        for batch, (images, labels) in enumerate(train_loader):
            if batch == batches:
                break
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            method.before_forward()
            loss = F.cross_entropy(model(images), labels)
            loss.backward()
            method.after_backward()
            method.step()
            loss_sum += loss.item()
        sync()
        train_seconds = time.perf_counter() - started
        method.end_epoch(epoch)
        with method.training_view():
            test_float = accuracy()
        with method.binarised():
            test_binary = accuracy()
        sync()
        epoch_seconds.append(time.perf_counter() - started)
    return {"train_seconds": train_seconds, "epoch_seconds": epoch_seconds[-1],
            "first_epoch_seconds": epoch_seconds[0], "train_images": batches * config.batch_size,
            "loss": loss_sum / batches, "test_acc_float": test_float, "test_acc_binary": test_binary}
