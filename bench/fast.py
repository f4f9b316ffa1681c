"""The trainer (`bnew_core.train.train`) for `config.epochs` epochs, timed by a callback."""

from __future__ import annotations

import time

from bnew_core.callbacks import Callback
from bnew_core.config import TrialConfig
from bnew_core.train import train


class EpochClock(Callback):
    """Wall time of each epoch, training + evaluation + checkpoint, from the end of setup (data on
    the device, model built) on; epoch 0 also carries the one-off warm-up (torch.compile)."""

    def on_train_start(self, config, start_epoch: int, batches_per_epoch: int) -> None:
        self.marks = [time.perf_counter()]

    def on_epoch_end(self, epoch: int, metrics: dict, checkpoint) -> None:
        self.marks.append(time.perf_counter())


def run(config: TrialConfig) -> dict[str, float]:
    """Train `config` with the trainer; the figures are the last epoch's."""
    clock = EpochClock()
    history = train(config, callbacks=[clock]).history
    epoch_seconds = [end - start for start, end in zip(clock.marks, clock.marks[1:])]
    last = history[-1]
    return {"train_seconds": last["epoch_seconds"], "epoch_seconds": epoch_seconds[-1],
            "first_epoch_seconds": epoch_seconds[0],
            "train_images": round(last["images_per_second"] * last["epoch_seconds"]),
            "loss": last["loss"], "test_acc_float": last["test_acc_float"],
            "test_acc_binary": last["test_acc_binary"]}
