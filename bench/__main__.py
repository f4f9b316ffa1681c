"""`python -m bench`: the trainer against the plain baseline trainer, side by side.

Each repeat of each trainer runs in its own subprocess (so peak memory is per run), interleaved
baseline, fast, baseline, fast, ... so that load from other processes on the machine hits both
alike. Each run trains `--epochs` (default 2) epochs and is timed on its last one: the
steady-state epoch a long trial repeats, while the first epoch's extra time (compilation, worker
start-up) is reported on its own. Prints medians, the ratio, and the projected time of the paper
presets at the measured rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bnew_core.config import TrialConfig

KINDS = ("baseline", "fast")


def preset_trial_epochs() -> dict[str, int]:
    """Trial-epochs (one epoch of one model over the 45k training images) of each paper preset.

    paper-table1 (CIFAR-100): quantise 4 optimisers x 2 distillation x (200 + 1000) epochs x 5 seeds
    = 48,000; pretrain 200 epochs per (distillation, seed) = 2 x 5 x 200 = 2,000; teachers 200 epochs
    per seed = 1,000; in all 51,000.
    paper-table2 (CIFAR-100, 200 epochs, 5 seeds): quantise (10 STE rows + 12 BNEW rows) x 5 x 200 =
    22,000; pretrain per architecture variant (baseline, no_learnable_bias, no_prelu, no_scale,
    no_distillation, classic_ste, binary_first_last, binary_bottlenecks, no_scale_classic_ste; the
    regulariser rows reuse the baseline's, no_pretrain has none) 9 x 5 x 200 = 9,000; the real-valued
    ResNet-20 5 x 200 = 1,000; teachers 1,000; in all 33,000.
    paper-main: table1's grid on CIFAR-10 and CIFAR-100, 2 x 51,000 = 102,000.
    (`bnew sweep plan <preset>` counts the same from the preset files.) Teacher epochs train a
    WRN-22-1, which is projected at the ResNet-20's rate.
    """
    table1 = 4 * 2 * (200 + 1000) * 5 + 2 * 5 * 200 + 5 * 200
    table2 = 22 * 5 * 200 + 9 * 5 * 200 + 5 * 200 + 5 * 200
    return {"paper-table1": table1, "paper-table2": table2, "paper-main": 2 * table1}


def trial_config(args: argparse.Namespace, output_dir: Path) -> TrialConfig:
    """Quantise epochs with the chosen optimiser (no freeze, so every timed epoch trains alike)."""
    optimiser = {"name": args.optimiser}
    if args.optimiser in ("bnew", "bmd"):
        optimiser["freeze_epochs"] = 0
    return TrialConfig.model_validate({
        "name": "bench", "phase": "quantise", "optimiser": optimiser, "epochs": args.epochs, "seed": 0,
        "data": {"name": "imagefolder", "root": str(args.data), "val_size": args.val_size},
        "device": args.device, "max_batches": args.max_batches, "output_dir": str(output_dir),
        "compile": args.compile, "checkpoint_every": 1,
    })


def worker(kind: str, config_json: str) -> None:
    """Subprocess body: one trainer's run, its last epoch's figures and peak memory as one JSON line."""
    import resource

    import torch

    config = TrialConfig.model_validate_json(config_json)
    if kind == "baseline":
        from .baseline import run
    else:
        from .fast import run
    result = run(config)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["workers_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if torch.cuda.is_available() and config.device != "cpu":
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH-RESULT " + json.dumps(result), flush=True)


def spawn(kind: str, config: TrialConfig) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench", "--worker", kind, config.model_dump_json()],
                            stdout=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen) -> dict:
    output, _ = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"bench: a worker failed (exit {process.returncode})")
    line = next(line for line in output.splitlines() if line.startswith("BENCH-RESULT "))
    return json.loads(line.removeprefix("BENCH-RESULT "))


def summarise(runs: list[dict], full_images: int) -> dict:
    """Medians over repeats; a shortened epoch is projected to a full one at its training rate."""
    rate = statistics.median(run["train_images"] / run["train_seconds"] for run in runs)
    eval_seconds = statistics.median(run["epoch_seconds"] - run["train_seconds"] for run in runs)
    summary = {
        "repeats": len(runs),
        "images_per_second": rate,
        "epoch_seconds": statistics.median(run["epoch_seconds"] for run in runs),
        "full_epoch_seconds": full_images / rate + eval_seconds,
        "eval_seconds": eval_seconds,
        "warmup_seconds": statistics.median(run["first_epoch_seconds"] - run["epoch_seconds"] for run in runs),
        "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
        "workers_peak_rss_mb": max(run["workers_peak_rss_mb"] for run in runs),
        "test_acc_binary": statistics.median(run["test_acc_binary"] for run in runs),
        "runs": runs,
    }
    if "peak_cuda_mb" in runs[0]:
        summary["peak_cuda_mb"] = max(run["peak_cuda_mb"] for run in runs)
    return summary


def concurrent_rates(args: argparse.Namespace, counts: list[int], scratch: Path) -> dict[int, float]:
    """Aggregate training images/s of N trials sharing the device (the sum of their rates)."""
    rates = {}
    for count in counts:
        processes = [spawn("fast", trial_config(args, scratch / f"concurrent{count}-{index}")) for index in range(count)]
        runs = [collect(process) for process in processes]
        rates[count] = sum(run["train_images"] / run["train_seconds"] for run in runs)
    return rates


def print_tables(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"epoch {report['epochs']} of {report['epochs']}, {report['device']}, "
                        f"median of {report['repeats']} (interleaved)")
    for column in ("trainer", "images/s (train)", "s/epoch (measured)", "s/epoch (full, projected)",
                   "first-epoch extra s", "peak memory MB", "binary test acc %"):
        table.add_column(column, justify="right" if column != "trainer" else "left")
    for kind in KINDS:
        row = report[kind]
        memory = f"{row['peak_rss_mb']:.0f} RSS"
        if kind == "baseline":
            memory += f" (+{row['workers_peak_rss_mb']:.0f} per worker)"
        if "peak_cuda_mb" in row:
            memory += f", {row['peak_cuda_mb']:.0f} CUDA"
        table.add_row(kind, f"{row['images_per_second']:.0f}", f"{row['epoch_seconds']:.1f}",
                      f"{row['full_epoch_seconds']:.1f}", f"{row['warmup_seconds']:.1f}", memory,
                      f"{row['test_acc_binary']:.1f}")
    ratio = report["ratio"]
    table.add_row("ratio fast/baseline", f"{ratio['images_per_second']:.2f}x", f"{ratio['epoch_seconds']:.2f}x",
                  f"{ratio['full_epoch_seconds']:.2f}x", "", "", "")
    console.print(table)
    presets = Table(title="projected time of the paper presets (one trial at a time, at the measured rate)")
    for column in ("preset", "trial-epochs", "hours (fast)", "hours (baseline)"):
        presets.add_column(column, justify="right" if column != "preset" else "left")
    for name, row in report["presets"].items():
        presets.add_row(name, f"{row['trial_epochs']:,}", f"{row['hours_fast']:,.0f}", f"{row['hours_baseline']:,.0f}")
    console.print(presets)
    if report.get("concurrent"):
        packing = Table(title="concurrent trials on one device (fast trainer)")
        packing.add_column("trials", justify="right")
        packing.add_column("aggregate images/s", justify="right")
        for count, rate in report["concurrent"].items():
            packing.add_row(str(count), f"{rate:.0f}")
        console.print(packing)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BNEW_BENCH_DATA", "/tmp/cifar")),
                        help="ImageFolder tree with train/ and test/ (the shared CIFAR-10 JPEGs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batches", type=int, default=None, help="shorten each epoch (default: full)")
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--optimiser", default="bnew", choices=["ste", "bmd", "bop", "bnew"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last one is timed")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="run the fast trainer eager (default: torch.compile, as long trials do)")
    parser.add_argument("--concurrent", default="",
                        help="e.g. 1,2,4,8: aggregate rate of N concurrent fast trials (meant for GPUs)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--scratch", type=Path, default=None, help="trial output folders (default: a temp dir)")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats: at least 1")
    if not all(part.strip().isdigit() and int(part) > 0 for part in args.concurrent.split(",") if part):
        parser.error(f"--concurrent: {args.concurrent!r} is not a list of trial counts like 1,2,4,8")
    if args.worker:
        worker(*args.worker)
        return {}

    import tempfile

    import torch

    from bnew_core.data import load_data
    from bnew_core.train import resolve_device

    device = resolve_device(args.device)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="bnew-bench-"))
    config = trial_config(args, scratch)
    train_images = len(load_data(config.data).train)  # also fills the decoded-tensor cache
    full_images = train_images // config.batch_size * config.batch_size
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for repeat in range(args.repeats):
        for kind in KINDS:
            started = time.perf_counter()
            runs[kind].append(collect(spawn(kind, trial_config(args, scratch / f"{kind}{repeat}"))))
            print(f"repeat {repeat + 1}/{args.repeats} {kind}: {runs[kind][-1]['epoch_seconds']:.1f} s/epoch "
                  f"({time.perf_counter() - started:.0f} s with start-up)", file=sys.stderr, flush=True)
    report: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "device": str(device), "repeats": args.repeats,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{os.cpu_count()}",
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "max_batches": args.max_batches, "train_images_full_epoch": full_images, "optimiser": args.optimiser,
        "epochs": args.epochs, "compile": args.compile,
    }
    for kind in KINDS:
        report[kind] = summarise(runs[kind], full_images)
    fast, baseline = report["fast"], report["baseline"]
    report["ratio"] = {key: (fast[key] / baseline[key] if key == "images_per_second" else baseline[key] / fast[key])
                       for key in ("images_per_second", "epoch_seconds", "full_epoch_seconds")}
    report["presets"] = {
        name: {"trial_epochs": epochs, "hours_fast": epochs * fast["full_epoch_seconds"] / 3600,
               "hours_baseline": epochs * baseline["full_epoch_seconds"] / 3600}
        for name, epochs in preset_trial_epochs().items()
    }
    counts = [int(count) for count in args.concurrent.split(",") if count]
    if counts:
        report["concurrent"] = concurrent_rates(args, counts, scratch)
    print_tables(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    from bnew_core.config import BnewError

    try:
        main()
    except BnewError as error:  # bad data path or settings: one line, not a traceback
        raise SystemExit(f"python -m bench: {error}") from None
