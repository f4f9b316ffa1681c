"""`python -m bench.decode`: how fast an image tree's JPEGs decode, before and after the move from
torchvision.io (deprecated since torchvision 0.29) to TorchCodec (`bnew_core.data.decode_file`).

Takes `--images` JPEGs from the shared CIFAR-10 archive (`--archive`, extracted to a temporary
folder) or from an image tree (`--data`), checks that both decoders give the same pixels, then
decodes them all with each decoder in turn, `--repeats` times, interleaved (before, after, before,
...) so that load from other processes on the machine hits both alike. Prints the images/s of each
(median, min, max over the repeats) and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import tempfile
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

from bnew_core.data import decode_file

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def decode_before(path: Path) -> torch.Tensor:
    """What bnew_core.data did before: torchvision.io's read_file and decode_image."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)


DECODERS: dict[str, Callable[[Path], torch.Tensor]] = {
    f"torchvision.io {version('torchvision')} (before)": decode_before,
    f"torchcodec {version('torchcodec')} (after)": decode_file,
}


def sample_jpegs(archive: Path, count: int, folder: Path) -> list[Path]:
    """The first `count` JPEGs of the archive, extracted into `folder`."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                members.append(member)
                if len(members) == count:
                    break
        tar.extractall(folder, members=members, filter="data")
    return [folder / member.name for member in members]


def images_per_second(decode: Callable[[Path], torch.Tensor], paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        decode(path)
    return len(paths) / (time.perf_counter() - started)


def measure(paths: list[Path], repeats: int) -> dict[str, list[float]]:
    """images/s of each decoder, `repeats` rounds, interleaved; after a first pass that warms the
    page cache and the libraries and checks that both decoders agree on every pixel."""
    for path in paths:
        first, *others = (decode(path) for decode in DECODERS.values())
        if any(not torch.equal(first, other) for other in others):
            raise SystemExit(f"the decoders disagree on {path}")
    rates: dict[str, list[float]] = {name: [] for name in DECODERS}
    for _ in range(repeats):
        for name, decode in DECODERS.items():
            rates[name].append(images_per_second(decode, paths))
    return rates


def table(rates: dict[str, list[float]], count: int) -> str:
    width = max(map(len, rates))
    lines = [f"{count} JPEGs, {len(next(iter(rates.values())))} repeats",
             f"{'decoder':<{width}}  {'images/s median':>15}  {'min':>7}  {'max':>7}"]
    for name, values in rates.items():
        lines.append(f"{name:<{width}}  {statistics.median(values):>15,.0f}  {min(values):>7,.0f}  {max(values):>7,.0f}")
    before, after = (statistics.median(values) for values in rates.values())
    lines.append(f"after / before: {after / before:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help=f"a .tar.gz of JPEGs (default {ARCHIVE})")
    parser.add_argument("--data", type=Path, help="a folder of JPEGs (any depth) instead of the archive")
    parser.add_argument("--images", type=int, default=5000, help="JPEGs to decode per round (default 5000)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per decoder (default 5)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as scratch, warnings.catch_warnings():
        # Running torchvision.io's decoders is the point here: their deprecation warning is expected.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        if args.data:
            paths = sorted(args.data.rglob("*.jpg"))[: args.images]
        else:
            paths = sample_jpegs(args.archive, args.images, Path(scratch))
        if not paths:
            raise SystemExit(f"no JPEGs in {args.data or args.archive}")
        report = table(measure(paths, args.repeats), len(paths))
    print(report)
    return report


if __name__ == "__main__":
    main()
