"""Datasets and batch augmentation on tensors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnew_core.config import BnewError, DataConfig
from bnew_core.data import DIGITS_PATH, BatchLoader, load_data, random_crop


def test_random_crop_offsets_are_translations_with_zero_padding() -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4) + 1
    shifts = torch.tensor([[2, 2], [0, 3]])  # padding 2: (2, 2) is the identity
    out = random_crop(images, shifts, padding=2)
    assert torch.equal(out[0], images[0])
    # offset (0, 3): content moves down by 2 rows and left by 1 column; zeros fill the gap
    expected = torch.zeros(1, 4, 4, dtype=torch.uint8)
    expected[:, 2:, :3] = images[1, :, :2, 1:]
    assert torch.equal(out[1], expected)


def test_the_shipped_digits_are_scikit_learns_exactly() -> None:
    """The arrays `load_digits()` of scikit-learn 1.x returns (sha256 taken from it once), so runs
    trained when digits came from scikit-learn trained on the same images."""
    with np.load(DIGITS_PATH) as digits:
        images, labels = digits["images"], digits["labels"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"


def test_digits_split_and_normalisation() -> None:
    data = load_data(DataConfig(name="digits", val_size=100))
    assert (len(data.train), len(data.val), len(data.test)) == (1337, 100, 360)
    assert data.train.images.shape[1:] == (1, 8, 8) and data.train.images.dtype == torch.uint8
    assert data.num_classes == 10
    again = load_data(DataConfig(name="digits", val_size=100))
    assert torch.equal(again.val.images, data.val.images)  # fixed split seed
    loader = BatchLoader(data.train, data, DataConfig(name="digits"), 64, seed=0)
    images, labels = next(loader.epoch(0))
    assert images.shape == (64, 1, 8, 8) and images.dtype == torch.float32
    normalised = loader.normalise(data.train.images)
    assert normalised.mean().abs() < 1e-3 and (normalised.std() - 1).abs() < 1e-2


def test_validation_split_is_disjoint_from_training() -> None:
    data = load_data(DataConfig(name="synthetic", synthetic_size=300, val_size=50))
    train_rows = {tuple(x.flatten().tolist()) for x in data.train.images}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in data.val.images)
    assert len(data.train) == 250


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    data = load_data(DataConfig(name="synthetic", synthetic_size=256))
    config = DataConfig(name="synthetic")

    def first_batch(seed: int, epoch: int) -> torch.Tensor:
        return next(BatchLoader(data.train, data, config, 32, seed).epoch(epoch))[0]

    assert torch.equal(first_batch(1, 3), first_batch(1, 3))
    assert not torch.equal(first_batch(1, 3), first_batch(1, 4))
    assert not torch.equal(first_batch(1, 3), first_batch(2, 3))


def write_tree(root: Path, classes: int = 3, per_class: int = 4, size: int = 8) -> None:
    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for label in range(classes):
            folder = root / part / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


def test_imagefolder_decodes_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNEW_CACHE_DIR", str(tmp_path / "cache"))
    write_tree(tmp_path / "tree")
    data = load_data(DataConfig(name="imagefolder", root=tmp_path / "tree"))
    assert data.train.images.shape == (12, 3, 8, 8) and data.num_classes == 3
    first = np.array(Image.open(tmp_path / "tree" / "train" / "class0" / "0.png"))  # a copy: writable
    assert torch.equal(data.train.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert list((tmp_path / "cache").glob("imagefolder-*.pt"))
    cached = load_data(DataConfig(name="imagefolder", root=tmp_path / "tree"))
    assert torch.equal(cached.train.images, data.train.images)


def test_an_undecodable_image_names_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNEW_CACHE_DIR", str(tmp_path / "cache"))
    write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "class1" / "notes.txt").write_text("not an image")
    with pytest.raises(BnewError, match=r"data.root: cannot decode .*/test/class1/notes.txt \("):
        load_data(DataConfig(name="imagefolder", root=tmp_path / "tree"))


def test_missing_datasets_name_the_field_and_flag(tmp_path: Path) -> None:
    with pytest.raises(BnewError, match=r"data.root: .*missing/train is not a directory"):
        load_data(DataConfig(name="imagefolder", root=tmp_path / "missing"))
    with pytest.raises(BnewError, match=r"data.root: cifar100 not found in .*--download"):
        load_data(DataConfig(name="cifar100", root=tmp_path / "nothing"))
    with pytest.raises(BnewError, match="data.val_size"):
        load_data(DataConfig(name="digits", val_size=5000))
