"""Faults inside one trial, without Ray: a diverging loss stops training in its first epoch, a
damaged checkpoint is detected by its checksum and a restore falls back to the one before, and
every metric the trainer reports is one a sweep's report may name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bnew_core.callbacks import EPOCH_METRICS
from bnew_core.checkpoint import CHECKPOINT_FORMAT, CorruptCheckpointError, checksum_path, load_file
from bnew_core.config import build_trial_config
from bnew_core.train import DivergedError, train


def trial(tmp_path: Path, **settings) -> object:
    return build_trial_config({
        "phase": "quantise", "optimiser": {"name": "ste"}, "epochs": 2, "batch_size": 32, "device": "cpu", "max_batches": 2,
        "data": {"name": "synthetic", "synthetic_size": 128}, "output_dir": str(tmp_path / "out"), **settings,
    })


def test_a_diverging_loss_stops_training_in_its_first_epoch(tmp_path: Path) -> None:
    with pytest.raises(DivergedError, match=r"loss: nan in epoch 0, the trial diverged \(lr 1e\+06\)"):
        train(trial(tmp_path, lr=1e6, optimiser={"name": "ste"}))
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # no checkpoint of NaN weights


@pytest.mark.parametrize("optimiser", ["ste", "bmd", "bop", "bnew"])
def test_every_reported_metric_is_a_known_one(tmp_path: Path, optimiser: str) -> None:
    result = train(trial(tmp_path, optimiser={"name": optimiser}, data={
        "name": "synthetic", "synthetic_size": 128, "val_size": 32}))
    assert set(result.final_metrics) <= set(EPOCH_METRICS)


def test_a_damaged_checkpoint_fails_its_checksum(tmp_path: Path) -> None:
    checkpoint = train(trial(tmp_path, epochs=1)).checkpoint_path
    assert checksum_path(checkpoint).read_text().split()[1] == "checkpoint.pt"
    assert load_file(checkpoint, CHECKPOINT_FORMAT, "resume")["epoch"] == 0
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CorruptCheckpointError, match="does not match its checksum checkpoint.pt.sha256"):
        load_file(checkpoint, CHECKPOINT_FORMAT, "resume")
    checkpoint.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # one bit flipped
    with pytest.raises(CorruptCheckpointError):
        load_file(checkpoint, CHECKPOINT_FORMAT, "resume")


def test_a_restore_skips_damaged_checkpoints_for_the_newest_good_one(tmp_path: Path) -> None:
    from ray import tune

    from sweeps.run.trial import restore_checkpoint

    trained = train(trial(tmp_path, epochs=1)).checkpoint_path
    storage = tmp_path / "storage" / "trial_0"
    for index in range(3):  # what `CheckpointConfig(num_to_keep=2)` keeps, and a newer unregistered one
        folder = storage / f"checkpoint_00000{index}"
        folder.mkdir(parents=True)
        shutil.copy2(trained, folder / "checkpoint.pt")
        shutil.copy2(checksum_path(trained), folder / checksum_path(trained).name)
    (storage / "checkpoint_000002" / "checkpoint.pt").write_bytes(b"truncated")
    (storage / "checkpoint_000001" / "checkpoint.pt.sha256").unlink()

    restored, skipped = restore_checkpoint(tune.Checkpoint(str(storage / "checkpoint_000001")), tmp_path / "restored")
    assert restored == tmp_path / "restored" / "checkpoint_000000" / "checkpoint.pt"
    assert load_file(restored, CHECKPOINT_FORMAT, "resume")["epoch"] == 0
    assert len(skipped) == 2 and "checkpoint_000002" in skipped[0] and "checkpoint_000001" in skipped[1]

    (storage / "checkpoint_000000" / "checkpoint.pt").write_bytes(b"")
    assert restore_checkpoint(tune.Checkpoint(str(storage / "checkpoint_000001")), tmp_path / "again")[0] is None


def test_tune_passes_over_an_old_checkpoint_deleted_before_the_driver_stopped(tmp_path: Path) -> None:
    """A restored experiment state can list a checkpoint Tune had deleted already (`num_to_keep`):
    registering the next one must not fail on it (Ray 2.60 alone raises FileNotFoundError here)."""
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from sweeps.run.driver import skip_deleted_checkpoints

    skip_deleted_checkpoints()
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1))
    for index in range(3):  # the first is listed but gone; the second is there and deleted when the third comes
        folder = tmp_path / f"checkpoint_00000{index}"
        if index:
            folder.mkdir()
        manager.register_checkpoint(_TrainingResult(Checkpoint(str(folder)), {"epoch": index}))
    assert [result.checkpoint.path for result in manager.best_checkpoint_results] == [str(tmp_path / "checkpoint_000002")]
    assert not (tmp_path / "checkpoint_000001").exists()
