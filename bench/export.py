"""`python -m bench.export`: the exported binary network (`bnew_core.export`) against PyTorch eager
(the float simulation the trainer evaluates: sign, then a float conv of the +-1 weights) and
against OpenVINO running the same network with its +-1 weights as float32 convolutions.

The network is a ResNet-20 for CIFAR's 3x32x32 images and 10 classes, its binary weights set to
signs and its BatchNorm statistics taken from one batch of random images (speed does not depend
on what the weights are), or a trained `--model` with its own test images. For 1 and 2 threads
(`--threads`) it measures the latency of one image and the images/s at batch `--batch`, each
runtime in turn within a round (so that load from other processes hits all alike), `--repeats`
rounds, and prints medians, ratios to PyTorch, and the sizes of the files.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import openvino as ov
import torch

from bnew_core.checkpoint import MODEL_FORMAT, save_atomic
from bnew_core.config import TrialConfig
from bnew_core.data import ImageData, Split
from bnew_core.export import (
    Export,
    ExportCheck,
    IRBuilder,
    batches,
    compare,
    compile_export,
    export_model,
    read_export,
    trial_data,
)
from bnew_core.models import build_model, load_trained

RUNTIMES = ("pytorch eager", "openvino float", "openvino binary")


def random_data(image_size: int, count: int) -> ImageData:
    """Random 3-channel images of CIFAR's shape in place of a dataset (the timing ignores content)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    split = Split(images, torch.randint(0, 10, (count,), generator=generator))
    return ImageData(split, split, None, 10, torch.full((3,), 120.0), torch.full((3,), 64.0))


def cifar_shaped_model(folder: Path, data: ImageData) -> Path:
    """A ResNet-20 model.pt for `data`'s images: signs as binary weights, BN statistics of one batch."""
    config = TrialConfig(phase="quantise", optimiser={"name": "ste"}, data={"name": "cifar10"}, device="cpu",
                         output_dir=str(folder))
    torch.manual_seed(0)
    network = build_model(config.model, data.in_channels, data.num_classes)
    with torch.no_grad():
        for weight in network.binary_weights():
            weight.copy_(torch.where(weight >= 0, 1.0, -1.0))
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        network.train()((data.test.images[:256].float() - 120) / 64)
    return save_atomic({"format": MODEL_FORMAT, "config": config.model_dump(mode="json"), "model": network.state_dict(),
                        "num_classes": data.num_classes, "in_channels": data.in_channels, "metrics": {}},
                       folder / "model.pt")


@dataclass
class Prepared:
    """What is measured: the PyTorch network, both IRs and a batch of input images."""

    model_path: Path
    binary: Export
    float_ir: Export
    """The same network with float32 block convs (same manifest: same input)."""
    images: torch.Tensor


def prepare(folder: Path, model: Path | None, batch: int) -> Prepared:
    data = None
    if model is None:
        data = random_data(32, max(batch, 256))
        model = cifar_shaped_model(folder, data)
    trained = load_trained(model)
    data = data if data is not None else trial_data(trained.config)
    binary = export_model(model, folder / "binary", data=data)
    float_model = IRBuilder(trained.config, binary=False).network(trained.network, binary.manifest["input"]["shape"])
    (folder / "float").mkdir()
    ov.save_model(float_model, str(folder / "float" / "model.xml"), compress_to_fp16=False)
    images = next(batches(data, trained.config, batch))
    if len(images) < batch:  # a small test split: repeated up to the batch size
        images = images.repeat((batch + len(images) - 1) // len(images), 1, 1, 1)[:batch]
    return Prepared(model, read_export(folder / "binary"), Export(folder / "float", binary.manifest), images)


def runners(prepared: Prepared, threads: int, batch: int) -> dict[str, Callable[[], object]]:
    """A call per runtime that runs `batch` images through it on `threads` threads."""
    network = load_trained(prepared.model_path).network
    images = prepared.images[:batch].contiguous()
    array = images.numpy()

    def eager() -> object:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            return network(images)

    calls: dict[str, Callable[[], object]] = {RUNTIMES[0]: eager}
    for name, export in ((RUNTIMES[1], prepared.float_ir), (RUNTIMES[2], prepared.binary)):
        request = compile_export(export, batch, threads).create_infer_request()
        calls[name] = lambda request=request: request.infer({0: array})
    return calls


def seconds_per_call(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def measure(prepared: Prepared, threads: list[int], batch: int, repeats: int, latency_calls: int,
            throughput_calls: int) -> dict[str, dict[str, list[float]]]:
    """`{"<runtime> x<threads>": {"latency_ms": [...], "images_per_s": [...]}}`, one value per round."""
    results: dict[str, dict[str, list[float]]] = {}
    for count in threads:
        for size, calls, metric in ((1, latency_calls, "latency_ms"), (batch, throughput_calls, "images_per_s")):
            timed = runners(prepared, count, size)
            for call in timed.values():  # warm-up: first-call allocations, lazy kernel choice
                call()
            for _ in range(repeats):
                for name, call in timed.items():
                    seconds = seconds_per_call(call, calls)
                    value = 1000 * seconds if metric == "latency_ms" else size / seconds
                    results.setdefault(f"{name} x{count}", {}).setdefault(metric, []).append(value)
    torch.set_num_threads(max(threads))
    return results


def agreement(prepared: Prepared) -> dict[str, ExportCheck]:
    """Each IR against PyTorch on the measured batch (`bnew_core.export.compare`: a sanity check)."""
    network = load_trained(prepared.model_path).network
    return {name: compare(network, export, [prepared.images])
            for name, export in (("float IR", prepared.float_ir), ("binary IR", prepared.binary))}


def file_sizes(prepared: Prepared) -> dict[str, int]:
    sizes = {"model.pt (PyTorch, float32)": prepared.model_path.stat().st_size}
    for name, export in (("float IR", prepared.float_ir), ("binary IR", prepared.binary)):
        sizes[f"{name} model.bin"] = export.bin.stat().st_size
        sizes[f"{name} model.xml"] = export.xml.stat().st_size
    sizes["binary weights, 1 bit each"] = prepared.binary.manifest["binary_weights"]["bytes"]
    sizes["binary weights as float32"] = prepared.binary.manifest["binary_weights"]["float32_bytes"]
    return sizes


def table(results: dict[str, dict[str, list[float]]], batch: int, repeats: int) -> str:
    lines = [f"medians of {repeats} rounds; x = thread count; ratios to PyTorch eager at the same thread count",
             f"| runtime | batch 1 latency ms | vs eager | batch {batch} images/s | vs eager |", "|---|---:|---:|---:|---:|"]
    for key, values in results.items():
        eager = results[RUNTIMES[0] + " x" + key.rpartition(" x")[2]]
        latency, rate = statistics.median(values["latency_ms"]), statistics.median(values["images_per_s"])
        lines.append(f"| {key} | {latency:.2f} | {statistics.median(eager['latency_ms']) / latency:.2f}x | {rate:,.0f} "
                     f"| {rate / statistics.median(eager['images_per_s']):.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="A trained model.pt (default: a ResNet-20 for 3x32x32 images).")
    parser.add_argument("--threads", default="1,2", help="Thread counts, comma-separated.")
    parser.add_argument("--batch", type=int, default=256, help="Batch size of the throughput column.")
    parser.add_argument("--repeats", type=int, default=5, help="Rounds (each runtime once per round).")
    parser.add_argument("--latency-calls", type=int, default=50, help="Batch-1 calls timed per round.")
    parser.add_argument("--throughput-calls", type=int, default=3, help="Batch calls timed per round.")
    parser.add_argument("--json", type=Path, help="Also write the raw numbers here.")
    args = parser.parse_args(argv)
    threads = [int(count) for count in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        prepared = prepare(Path(folder), args.model, args.batch)
        differences = agreement(prepared)
        sizes = file_sizes(prepared)
        results = measure(prepared, threads, args.batch, args.repeats, args.latency_calls, args.throughput_calls)
    print(f"OpenVINO {ov.get_version()}, torch {torch.__version__}; input {list(prepared.images.shape[1:])}")
    for name, check in differences.items():
        print(f"{name} against PyTorch: {check.line()}")
    print(table(results, args.batch, args.repeats))
    print("| file | bytes |\n|---|---:|\n" + "\n".join(f"| {name} | {size:,} |" for name, size in sizes.items()))
    report = {"results": results, "sizes": sizes, "agreement": {name: check.metrics() for name, check in differences.items()}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
