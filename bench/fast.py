"""One epoch of the trainer (`bnew_core.train.train`), timed by a callback."""

from __future__ import annotations

import time

from bnew_core.callbacks import Callback
from bnew_core.config import TrialConfig
from bnew_core.train import train


class EpochClock(Callback):
    """Wall time from the end of setup (data on the device, model built) to the end of epoch 0."""

    def on_train_start(self, config, start_epoch: int, batches_per_epoch: int) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint) -> None:
        if epoch == 0:
            self.epoch_seconds = time.perf_counter() - self.started


def run_epoch(config: TrialConfig) -> dict[str, float]:
    """Train epoch 0 of `config` with the trainer; epoch time includes its evaluation and checkpoint."""
    clock = EpochClock()
    metrics = train(config, callbacks=[clock]).history[0]
    return {"train_seconds": metrics["epoch_seconds"], "epoch_seconds": clock.epoch_seconds,
            "train_images": round(metrics["images_per_second"] * metrics["epoch_seconds"]),
            "loss": metrics["loss"], "test_acc_float": metrics["test_acc_float"],
            "test_acc_binary": metrics["test_acc_binary"]}
