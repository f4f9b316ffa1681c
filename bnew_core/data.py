"""Datasets as uint8 tensors on the training device, augmented in whole batches.

Every dataset is decoded once into `uint8[N, C, H, W]`; batches are cropped, flipped and
normalised with tensor ops on the device, so there are no DataLoader workers or per-image
PIL calls in the training loop.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from filelock import FileLock

from .config import BnewError, DataConfig


@dataclass
class Split:
    images: torch.Tensor
    """uint8[N, C, H, W]"""
    labels: torch.Tensor
    """int64[N]"""

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class ImageData:
    train: Split
    test: Split
    val: Split | None
    num_classes: int
    mean: torch.Tensor
    """float32[C] per-channel mean of the training images, in [0, 255] units."""
    std: torch.Tensor

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    def to(self, device: torch.device) -> "ImageData":
        val = self.val.to(device) if self.val is not None else None
        return ImageData(self.train.to(device), self.test.to(device), val, self.num_classes,
                         self.mean.to(device), self.std.to(device))


def load_data(config: DataConfig) -> ImageData:
    """Load, split and describe the dataset named by `config` (on the CPU)."""
    train, test, num_classes = LOADERS[config.name](config)
    val = None
    if config.val_size:
        if config.val_size >= len(train):
            raise BnewError(f"data.val_size: {config.val_size} leaves no training images of {len(train)}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.split_seed))
        val = Split(train.images[order[: config.val_size]], train.labels[order[: config.val_size]])
        keep = order[config.val_size:].sort().values
        train = Split(train.images[keep], train.labels[keep])
    if config.train_limit is not None:
        train = random_subset(train, config.train_limit, config.subset_seed("train"))
    if config.test_limit is not None:
        test = random_subset(test, config.test_limit, config.subset_seed("test"))
    pixels = train.images.transpose(0, 1).reshape(train.images.shape[1], -1).float()
    mean, std = pixels.mean(1), pixels.std(1).clamp_min(1.0)
    return ImageData(train, test, val, num_classes, mean, std)


def random_subset(split: Split, size: int, seed: int) -> Split:
    """`size` images of the split drawn with `seed`, in their original order (all if it has fewer).

    Random, not the first ones: image trees list their images class by class."""
    if size >= len(split):
        return split
    keep = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return Split(split.images[keep], split.labels[keep])


DIGITS_PATH = Path(__file__).parent / "datasets" / "digits.npz"
"""The 1,797 8x8 digits (UCI's optdigits, as scikit-learn ships them; datasets/README.md)."""


def load_digits(config: DataConfig) -> tuple[Split, Split, int]:
    """The 8x8 digits shipped in this package: a fixed 1437/360 train/test split."""
    with np.load(DIGITS_PATH) as digits:
        images = torch.from_numpy(np.rint(digits["images"] * (255 / 16)).astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits["labels"]).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1797))
    test, train = order[:360], order[360:]
    return Split(images[train], labels[train]), Split(images[test], labels[test]), 10


def load_synthetic(config: DataConfig) -> tuple[Split, Split, int]:
    """Ten classes of smooth 3x16x16 prototypes plus noise: learnable, seeded, instant."""
    generator = torch.Generator().manual_seed(config.split_seed)
    num_classes, size = 10, 16
    prototypes = torch.nn.functional.interpolate(torch.rand(num_classes, 3, 4, 4, generator=generator),
                                                 size=size, mode="bilinear", align_corners=False)

    def sample(count: int) -> Split:
        labels = torch.randint(num_classes, (count,), generator=generator)
        noise = 0.35 * torch.randn(count, 3, size, size, generator=generator)
        images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return Split(images, labels)

    return sample(config.synthetic_size), sample(max(config.synthetic_size // 4, 10)), num_classes


def load_cifar(config: DataConfig) -> tuple[Split, Split, int]:
    """CIFAR-10/100 through torchvision; downloads only when `data.download` is set."""
    from torchvision import datasets

    dataset_class = datasets.CIFAR10 if config.name == "cifar10" else datasets.CIFAR100
    root = config.root or Path("data")
    try:
        parts = [dataset_class(str(root), train=train, download=config.download) for train in (True, False)]
    except RuntimeError as exc:
        raise BnewError(
            f"data.root: {config.name} not found in {root} ({exc}); pass --download "
            f"(data.download: true) to fetch it, or point data.root at an existing copy"
        ) from None

    def to_split(dataset) -> Split:
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(dataset.targets, dtype=torch.long))

    return to_split(parts[0]), to_split(parts[1]), len(parts[0].classes)


def load_imagefolder(config: DataConfig) -> tuple[Split, Split, int]:
    """`root/train/<class>/*` and `root/test/<class>/*`, decoded once and cached as tensors."""
    if config.root is None:
        raise BnewError("data.root: imagefolder needs the directory holding train/ and test/")
    root = config.root.expanduser()
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise BnewError(f"data.root: {root / part} is not a directory (expected <root>/{part}/<class>/<images>)")
    cache = cache_path(root)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent trials on one node (the first wave of a sweep) decode the tree once: the others
    # wait for the cache instead of decoding it again on the same cores.
    with FileLock(str(cache) + ".lock"):
        return load_or_decode_tree(root, cache)


def load_or_decode_tree(root: Path, cache: Path) -> tuple[Split, Split, int]:
    """The tree's splits from the cache, else decoded and cached (call it holding the cache's lock)."""
    if cache.is_file():
        try:
            cached = torch.load(cache, weights_only=True)
            return Split(*cached["train"]), Split(*cached["test"]), int(cached["num_classes"])
        except Exception:  # a stale or truncated cache is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    train, classes = decode_image_tree(root / "train")
    test, test_classes = decode_image_tree(root / "test")
    if test_classes != classes:
        raise BnewError(f"data.root: {root}/train and {root}/test have different class folders")
    temporary = cache.with_suffix(f".tmp{os.getpid()}")
    torch.save({"train": (train.images, train.labels), "test": (test.images, test.labels),
                "num_classes": len(classes)}, temporary)
    os.replace(temporary, cache)
    return train, test, len(classes)


def cache_path(root: Path) -> Path:
    """Decoded-tensor cache of an image tree, keyed by its path and listing (root may be read-only)."""
    cache_dir = Path(os.environ.get("BNEW_CACHE_DIR", Path.home() / ".cache" / "bnew"))
    listing = sorted(str(path.relative_to(root)) for path in root.glob("*/*/*"))
    digest = hashlib.sha256("\n".join([str(root.resolve()), *listing]).encode()).hexdigest()[:16]
    return cache_dir / f"imagefolder-{digest}.pt"


def decode_image_tree(folder: Path) -> tuple[Split, list[str]]:
    """Decode every image below `folder/<class>/` to one uint8 tensor (all images one size)."""
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    if not classes:
        raise BnewError(f"data.root: {folder} has no class folders")
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            images.append(decode_file(path))
            labels.append(label)
    if len({tuple(image.shape) for image in images}) != 1:
        raise BnewError(f"data.root: images under {folder} differ in size; resize them to one size first")
    return Split(torch.stack(images), torch.tensor(labels, dtype=torch.long)), classes


def decode_file(path: Path) -> torch.Tensor:
    """An image file (JPEG, PNG, WebP, ...) as uint8[3, H, W] RGB. TorchCodec's decoder: torchvision.io's
    are deprecated since torchvision 0.29 (`python -m bench.decode` compares the two)."""
    from torchcodec.decoders import decode_image

    # The file's bytes in a writable tensor: given a path (or bytes), TorchCodec wraps them with a
    # warnings filter per call, which made CIFAR's 32x32 JPEGs decode ~40% slower.
    encoded = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    try:
        return decode_image(encoded, mode="RGB")
    except (RuntimeError, ValueError) as exc:  # ValueError: not a format it knows
        raise BnewError(f"data.root: cannot decode {path} ({exc})") from None


LOADERS = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "imagefolder": load_imagefolder,
}


class BatchLoader:
    """Shuffled, augmented, normalised batches of a `Split` held on the device.

    The order and augmentation of epoch e depend only on (seed, e), so a resumed run sees
    exactly the batches of an uninterrupted one.
    """

    def __init__(self, split: Split, data: ImageData, config: DataConfig, batch_size: int, seed: int,
                 max_batches: int | None = None, channels_last: bool = False) -> None:
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.mean = data.mean.view(1, -1, 1, 1)
        self.std = data.std.view(1, -1, 1, 1)
        small = data.image_size < 32
        self.padding = config.crop_padding if config.crop_padding is not None else (1 if small else 4)
        self.flip = config.flip if config.flip is not None else config.name != "digits"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        full_batches = len(split) // batch_size  # drop the ragged last batch, as usual for BN
        if full_batches == 0:
            raise BnewError(f"batch_size: {batch_size} is larger than the {len(split)} training images")
        self.batches = min(full_batches, max_batches) if max_batches else full_batches

    def __len__(self) -> int:
        return self.batches

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        device = self.split.images.device
        order = torch.randperm(len(self.split), generator=generator).to(device)
        count = self.batches * self.batch_size
        shifts = torch.randint(0, 2 * self.padding + 1, (count, 2), generator=generator).to(device)
        flips = (torch.rand(count, generator=generator) < 0.5).to(device) if self.flip else None
        for start in range(0, count, self.batch_size):
            index = order[start: start + self.batch_size]
            images = self.split.images[index]
            images = random_crop(images, shifts[start: start + self.batch_size], self.padding)
            if flips is not None:
                images = torch.where(flips[start: start + self.batch_size].view(-1, 1, 1, 1), images.flip(3), images)
            yield self.normalise(images), self.split.labels[index]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def random_crop(images: torch.Tensor, shifts: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to size at per-image offsets `shifts[N, 2]`, in one gather."""
    if padding == 0:
        return images
    count, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (torch.arange(height, device=images.device) + shifts[:, :1]).view(count, 1, height, 1)
    cols = (torch.arange(width, device=images.device) + shifts[:, 1:]).view(count, 1, 1, width)
    batch = torch.arange(count, device=images.device).view(count, 1, 1, 1)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def eval_batches(split: Split, loader: BatchLoader, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Un-augmented, normalised batches of a whole split in order."""
    for start in range(0, len(split), batch_size):
        yield loader.normalise(split.images[start: start + batch_size]), split.labels[start: start + batch_size]
