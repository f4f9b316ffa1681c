"""The `bnew` command line: `bnew train` runs one trial; `bnew sweep ...` plans, runs and
reports whole grids (`sweeps.cli.sweep`, `sweeps.cli.jobs`). Every command imports what it needs
when it runs (torch, Ray, MLflow), so `--help` and light commands start at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from bnew_core.callbacks import Callback, Metrics
from sweeps.cli.common import parse_set_option, user_errors
from sweeps.cli.export import register_export_commands
from sweeps.cli.jobs import register_job_commands
from sweeps.cli.sweep import sweep_app

app = typer.Typer(
    help="Train binary neural networks (BNEW, STE, BMD, BOP) one trial at a time or as Ray sweeps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main_options() -> None:
    """Train binary neural networks (BNEW, STE, BMD, BOP) one trial at a time or as Ray sweeps."""


class ProgressCallback(Callback):
    """A rich progress bar over all batches of the trial, with the last epoch's accuracies."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # lazy: start-up

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[status]}"), transient=False)
        self.task = None

    def on_train_start(self, config: Any, start_epoch: int, batches_per_epoch: int) -> None:
        self.progress.start()
        total = config.epochs * batches_per_epoch
        self.task = self.progress.add_task(f"{config.phase} {config.binary_optimiser}", total=total,
                                           completed=start_epoch * batches_per_epoch, status="")

    def on_batch_end(self, epoch: int, batch: int, batches_per_epoch: int) -> None:
        self.progress.advance(self.task)

    def on_epoch_end(self, epoch: int, metrics: Metrics, checkpoint: Path | None) -> None:
        self.progress.update(self.task, status=(
            f"epoch {epoch + 1} loss {metrics['loss']:.3f} float {metrics['test_acc_float']:.1f}% "
            f"binary {metrics['test_acc_binary']:.1f}% {metrics['images_per_second']:.0f} img/s"))

    def on_train_end(self, result: Any) -> None:
        self.progress.stop()


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="Trial config YAML (fields of TrialConfig). Omit for the digits demo."),
    phase: Optional[str] = typer.Option(None, help="teacher | pretrain | quantise | real"),
    optimiser: Optional[str] = typer.Option(None, help="ste | bmd | bop | bnew (quantise phase)"),
    dataset: Optional[str] = typer.Option(None, help="digits | synthetic | cifar10 | cifar100 | imagefolder"),
    data_root: Optional[Path] = typer.Option(None, help="Dataset directory (data.root)."),
    download: Optional[bool] = typer.Option(None, "--download/--no-download", help="Let torchvision download CIFAR."),
    epochs: Optional[int] = typer.Option(None, help="Epochs of this phase."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    lr: Optional[float] = typer.Option(None, help="Initial learning rate."),
    seed: Optional[int] = typer.Option(None, help="Seed of initialisation, shuffling and augmentation."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    output_dir: Optional[Path] = typer.Option(None, help="Where checkpoints, metrics and the final model go."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher checkpoint; turns distillation on."),
    init: Optional[Path] = typer.Option(None, help="Checkpoint to start from (the pretrained model)."),
    max_batches: Optional[int] = typer.Option(None, help="Debug cap on batches per epoch."),
    resume: Optional[Path] = typer.Option(None, help="Resume from this checkpoint.pt."),
    set_: list[str] = typer.Option([], "--set", help="Any field as dotted KEY=VALUE, e.g. model.scale=false."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Run one trial and print the final binary test accuracy.

    Every TrialConfig field can be given in CONFIG.yaml, by a flag for the common ones, or
    with --set KEY=VALUE; flags override the file. Without CONFIG, the defaults train on
    the 8x8 digits shipped with the package (no download).
    """
    from bnew_core.config import load_trial_config  # lazy: start-up
    from bnew_core.train import train as run_trial  # lazy: torch

    flags = {
        "phase": phase,
        "optimiser.name": optimiser,
        "data.name": dataset,
        "data.root": str(data_root) if data_root else None,
        "data.download": download,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": device,
        "output_dir": str(output_dir) if output_dir else None,
        "teacher_checkpoint": str(teacher) if teacher else None,
        "distillation": True if teacher else None,
        "init_checkpoint": str(init) if init else None,
        "max_batches": max_batches,
    }
    overrides = {key: value for key, value in flags.items() if value is not None}
    overrides.update(parse_set_option(set_))
    with user_errors():
        trial_config = load_trial_config(config, overrides)
        callbacks = [] if quiet else [ProgressCallback()]
        result = run_trial(trial_config, callbacks=callbacks, resume_from=resume)
    final = result.final_metrics
    typer.echo(
        f"final binary test accuracy: {final['test_acc_binary']:.2f}% "
        f"({trial_config.phase}, {trial_config.binary_optimiser}, {int(final['epoch']) + 1} epochs) "
        f"-> {result.model_path}"
    )


app.add_typer(sweep_app, name="sweep")
register_job_commands(sweep_app)
register_export_commands(app, sweep_app)
