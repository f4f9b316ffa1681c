"""How the trainer reports: small callbacks, so the same loop runs in a test, a debug
process, the `bnew train` command and inside a Ray Tune trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Metrics = dict[str, float]
"""Per-epoch metrics (keys in `EPOCH_METRICS`). Accuracies are percentages."""
EPOCH_METRICS = (
    "epoch", "loss", "train_acc", "test_acc_float", "test_acc_binary",
    "val_acc_binary",  # with a validation split
    "dist_to_binary", "flip_fraction", "lambda", "bmd_k", "bop_gamma",  # of the weight method
    "lr", "epoch_seconds", "images_per_second",
)
"""Every metric the trainer reports per epoch (a test checks it against a real run)."""


@dataclass
class TrialResult:
    """What a finished `train` call leaves behind."""

    final_metrics: Metrics
    history: list[Metrics]
    model_path: Path
    """Final weights and config: a `teacher_checkpoint` or `init_checkpoint` for later phases."""
    checkpoint_path: Path
    """Last resumable checkpoint (model, optimiser, method and RNG state)."""
    output_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Override what you need; every hook is a no-op by default."""

    def on_train_start(self, config: Any, start_epoch: int, batches_per_epoch: int) -> None:
        """Called once, after model and data are ready (start_epoch > 0 when resuming)."""

    def on_batch_end(self, epoch: int, batch: int, batches_per_epoch: int) -> None:
        """Called after every optimiser step (no metrics: reading them would sync the device)."""

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        """Called after evaluation; `checkpoint` is the resumable file written this epoch, if any."""

    def on_train_end(self, result: TrialResult) -> None:
        """Called once with the final result."""
