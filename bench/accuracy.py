"""`python -m bench.accuracy`: final binary test accuracy of each optimiser on real data.

Pretrains once (binary activations, float weights), then quantises that model with each
optimiser and prints the final fully-binarised test accuracy and the wall time of each. The
short budgets use BNEW lambda_rate 0.3 and a 2-epoch freeze for BNEW and BMD, which reached
~71% binary accuracy on the shared CIFAR-10 data with 8 + 10 epochs.

    python -m bench.accuracy --data /tmp/cifar --pretrain-epochs 8 --epochs 10 --optimisers ste,bmd,bop,bnew
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bnew_core.config import TrialConfig
from bnew_core.train import train


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("BNEW_BENCH_DATA", "/tmp/cifar")))
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10, help="quantise epochs per optimiser")
    parser.add_argument("--optimisers", default="ste,bmd,bop,bnew")
    parser.add_argument("--lambda-rate", type=float, default=0.3, help="BNEW's rate (0.01 is the paper's, for 1000 epochs)")
    parser.add_argument("--freeze-epochs", type=int, default=2, help="BNEW and BMD freeze (at most epochs - 1)")
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile on/off (default: the trainer's choice, on for trials of 2,000+ steps)")
    parser.add_argument("--output-dir", type=Path, default=None, help="trial folders (default: a temp dir)")
    parser.add_argument("--out", type=Path, help="also write the table here as text")
    args = parser.parse_args(argv)
    root = args.output_dir or Path(tempfile.mkdtemp(prefix="bnew-accuracy-"))

    def config(name: str, **fields) -> TrialConfig:
        return TrialConfig.model_validate({
            "name": name, "seed": args.seed, "device": args.device, "max_batches": args.max_batches,
            "data": {"name": "imagefolder", "root": str(args.data), "val_size": args.val_size},
            "output_dir": str(root / name), "compile": args.compile, **fields})

    rows: list[dict] = []
    freeze = min(args.freeze_epochs, args.epochs - 1)

    def report() -> None:
        """Print the table so far (and rewrite --out), so a run cut short still leaves its rows."""
        lines = [f"data {args.data}, pretrain {args.pretrain_epochs} epochs, quantise {args.epochs} epochs, "
                 f"max_batches {args.max_batches}, seed {args.seed}, BNEW lambda_rate {args.lambda_rate}, "
                 f"freeze {freeze} (BNEW, BMD)",
                 f"{'run':<10}{'epochs':>7}{'binary test %':>15}{'float test %':>14}{'wall s':>9}{'s/epoch':>9}"]
        for row in rows:
            lines.append(f"{row['run']:<10}{row['epochs']:>7}{row['test_acc_binary']:>15.2f}"
                         f"{row['test_acc_float']:>14.2f}{row['seconds']:>9.0f}{row['seconds'] / row['epochs']:>9.1f}")
        print(lines[-1] if len(rows) > 1 else "\n".join(lines), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n")

    started = time.perf_counter()
    pretrained = train(config("pretrain", phase="pretrain", epochs=args.pretrain_epochs))
    rows.append({"run": "pretrain", "epochs": args.pretrain_epochs, "seconds": time.perf_counter() - started,
                 **pretrained.final_metrics})
    report()
    for name in args.optimisers.split(","):
        optimiser: dict = {"name": name}
        if name in ("bnew", "bmd"):
            optimiser["freeze_epochs"] = freeze
        if name == "bnew":
            optimiser["lambda_rate"] = args.lambda_rate
        started = time.perf_counter()
        result = train(config(f"quantise-{name}", phase="quantise", optimiser=optimiser, epochs=args.epochs,
                              init_checkpoint=str(pretrained.model_path)))
        rows.append({"run": name, "epochs": args.epochs, "seconds": time.perf_counter() - started,
                     **result.final_metrics})
        report()

    return rows


if __name__ == "__main__":
    main()
