"""The trained binary network as a deployable artefact: an OpenVINO IR (`model.xml` + `model.bin`)
in which every binary 3x3 convolution is a `BinaryConvolution` on 1-bit weights, plus
`export.json` beside it (what the network expects and the sha256 of both files).

How the trained network binarises, and what each piece becomes (models.BinaryBlock, eval mode,
the final weights a trial saves in `model.pt`):

- Activations: `a = x + bias_a`, then `binary_sign(a)`: +1 where a >= 0, else -1 (sign(0) = +1).
  The IR spells it `Select(a >= 0, +1, -1)`: OpenVINO's CPU kernel binarises a float input of
  `BinaryConvolution` as x > 0, which would send a = 0 to -1.
- Weights: a finished quantise trial saves them as sign(w), or alpha_c * sign(w) with
  `model.weight_scaling`. They become a `u1` constant, bit 1 = +1. `BinaryConvolution` reads
  the bits of each byte from the lowest up (numpy's `bitorder="little"`); OpenVINO's `u1`
  element type, as `Convert` reads it, from the highest down ("big"): float layers with 1-bit
  weights (the first/last and bottleneck ablations) are packed that way.
- Zero padding: the trained conv pads its +-1 input with zeros, `BinaryConvolution` pads with
  `pad_value` (+1 here), adding sum(W) over the taps that fall into the padding. That sum, per
  output channel and border position, is subtracted right after the convolution. It is computed
  in the graph from the weight bits themselves (the IR stores no extra tensor for it) with ops
  that OpenVINO folds into one constant when it compiles; all its values are small integers, so
  the result is exact.
- Scale alpha_c (weight scaling), the learnable scale and the BatchNorm make one multiply-add
  per channel after it; learnable biases, PReLU, the residual adds, the float stem and the
  classifier are ordinary ops.

The IR's batch size is 1 (the CPU plugin's `BinaryConvolution` needs static shapes):
`compile_export` reshapes it to the batch asked for.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import openvino as ov
import torch
from openvino import opset1 as ops
from torch import nn

from .binarise import SignActivation
from .checkpoint import sha256, verify_checksum, write_checksum
from .config import BnewError, TrialConfig
from .data import BatchLoader, ImageData, eval_batches, load_data
from .models import BinaryBlock, BinaryResNet20, TrainedModel, load_trained

EXPORT_FORMAT = "bnew-openvino-v1"
XML_FILE, BIN_FILE, MANIFEST_FILE = "model.xml", "model.bin", "export.json"
TIE_DISTANCE = 1e-6
"""A value entering a sign this close to 0 may land on either side in another runtime's float
rounding: an image with one may disagree and is counted apart."""
LOGIT_TOLERANCE = 1e-4
"""Largest |logit difference| the check accepts on images without such a tie."""
RUNTIME_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
"""OpenVINO's CPU plugin runs f32 models in bf16 where the CPU has it, unless told otherwise."""
PAD_VALUE = 1.0
"""What `BinaryConvolution` pads its binarised input with (+1 or -1; the correction undoes it)."""


# --- the trained model ------------------------------------------------------------------
def parameter_names(network: nn.Module) -> dict[int, str]:
    return {id(parameter): name for name, parameter in network.named_parameters()}


def export_refusal(trained: TrainedModel) -> str | None:
    """Why this model cannot be exported as a binary network (one line), or None if it can."""
    config = trained.config
    if config.phase != "quantise":
        return (f"phase {config.phase}: only a quantise trial's model has binary weights "
                f"({'a real-valued network' if config.phase in ('teacher', 'real') else 'float weights'})")
    names = parameter_names(trained.network)
    for weight in trained.network.binary_weights():
        magnitude = weight.detach().abs().flatten(1)
        alpha = magnitude[:, :1]
        binary = bool((magnitude == alpha).all()) and (config.model.weight_scaling or bool((alpha == 1).all()))
        if not binary:
            form = "alpha * sign(w) per output filter" if config.model.weight_scaling else "+-1"
            return f"{names[id(weight)]}: weights are not binary ({form}); a model.pt of an unfinished trial?"
    return None


def split_binary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A binary weight tensor as (signs: bool, True = +1; alpha per output filter, shape [C_out])."""
    return weight.detach() >= 0, weight.detach().abs().flatten(1)[:, 0]


# --- building the graph -------------------------------------------------------------------
Node = Any
"""An OpenVINO node output (`openvino.Output`), what the opset functions take and return."""
SIGN_INPUT = "sign_input.{}"
"""Tensor name of the values entering block i's sign (the check reads them back)."""


def bit_constant(signs: torch.Tensor, bitorder: str) -> Node:
    """A `u1` constant of `signs`' shape, one bit per weight (1 = +1), packed in `bitorder`."""
    tensor = ov.Tensor(ov.Type.u1, ov.Shape(list(signs.shape)))
    tensor.data[:] = np.packbits(signs.cpu().numpy().reshape(-1).astype(np.uint8), bitorder=bitorder)
    return ov.op.Constant(tensor).output(0)


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as x * k + b per channel (how PyTorch's CPU kernel computes it too)."""
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return k, bn.bias.detach() - bn.running_mean * k


def output_size(size: int, stride: int) -> int:
    return (size + 2 - 3) // stride + 1  # a 3x3 kernel, padding 1


def spatial(node: Node) -> tuple[int, int]:
    shape = node.get_partial_shape()
    return shape[2].get_length(), shape[3].get_length()


class IRBuilder:
    """Builds the OpenVINO graph of one network; equal small constants (shapes, 0, +-1, the
    padding geometry) are made once and shared, which keeps model.xml and model.bin small."""

    def __init__(self, config: TrialConfig, binary: bool = True) -> None:
        self.model = config.model
        self.binary = binary
        """False: the block convs as float32 `Convolution`s of the same +-1 weights (what the
        binary ones are measured against in `python -m bench.export`)."""
        self.constants: dict[tuple[str, tuple[int, ...], bytes], Node] = {}

    def constant(self, values: torch.Tensor | np.ndarray | float | list, dtype: type = np.float32) -> Node:
        array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        array = np.ascontiguousarray(array.astype(dtype))
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self.constants:
            self.constants[key] = ops.constant(array).output(0)
        return self.constants[key]

    def per_channel(self, values: torch.Tensor) -> Node:
        """A [C] vector as a [1, C, 1, 1] constant that broadcasts over NCHW."""
        return self.constant(values.detach().reshape(1, -1, 1, 1))

    def multiply_add(self, x: Node, k: torch.Tensor, b: torch.Tensor) -> Node:
        return ops.add(ops.multiply(x, self.per_channel(k)), self.per_channel(b)).output(0)

    def unpacked_signs(self, bits: Node, shape: tuple[int, ...], bitorder: str) -> Node:
        """A `u1` constant as +-1 floats of `shape`. `Convert` reads each byte's bits from the
        highest down, so the bits of a `BinaryConvolution` ("little") are reversed per byte first."""
        values = ops.convert(ops.reshape(bits, self.constant([-1], np.int64), False), "f32")
        if bitorder == "little":
            assert int(np.prod(shape)) % 8 == 0, "a BinaryConvolution's bits fill whole bytes here"
            per_byte = ops.reshape(values, self.constant([-1, 8], np.int64), False)
            values = ops.gather(per_byte, self.constant(list(range(7, -1, -1)), np.int64), self.constant(1, np.int64))
        values = ops.reshape(values, self.constant(list(shape), np.int64), False)
        return ops.subtract(ops.multiply(values, self.constant(2.0)), self.constant(1.0)).output(0)

    def inside_taps(self, size: int, stride: int) -> Node:
        """[3, out]: 1 where kernel row (or column) k of output position o reads the input, 0
        where it reads the padding (a 3x3 kernel with padding 1)."""
        taps = [[1 if 0 <= o * stride + k - 1 < size else 0 for o in range(output_size(size, stride))]
                for k in range(3)]
        return ops.convert(self.constant(taps, np.uint8), "f32").output(0)

    def padding_correction(self, bits: Node, shape: tuple[int, ...], size: tuple[int, int], stride: int) -> Node:
        """[1, C_out, OH, OW]: what padding with `PAD_VALUE` adds to a zero-padded binary conv,
        PAD_VALUE * the sum of the weights over the taps that fall into the padding.

        per_tap[c, kh, kw] sums the signs over input channels; the taps inside the input at (oh, ow)
        are rows[kh, oh] * cols[kw, ow], so correction = PAD_VALUE * (sum(per_tap) - rows^T per_tap cols)."""
        signs = self.unpacked_signs(bits, shape, "little")
        per_tap = ops.reduce_sum(signs, self.constant([1], np.int64), False)  # [C_out, 3, 3]
        total = ops.reduce_sum(per_tap, self.constant([1, 2], np.int64), True)  # [C_out, 1, 1]
        rows, cols = self.inside_taps(size[0], stride), self.inside_taps(size[1], stride)
        inside = ops.matmul(ops.matmul(rows, per_tap, True, False), cols, False, False)  # [C_out, OH, OW]
        correction = ops.multiply(ops.subtract(total, inside), self.constant(PAD_VALUE))
        return ops.unsqueeze(correction, self.constant([0], np.int64)).output(0)

    def weights(self, weight: torch.Tensor, binary: bool) -> Node:
        """A float conv's (or the classifier's) weights: float32, or 1-bit when they are binary."""
        if not binary:
            return self.constant(weight)
        signs, alpha = split_binary(weight)
        values = self.unpacked_signs(bit_constant(signs, "big"), tuple(weight.shape), "big")
        if bool((alpha == 1).all()):
            return values
        return ops.multiply(values, self.constant(alpha.reshape(-1, *[1] * (weight.dim() - 1)))).output(0)

    def float_conv(self, x: Node, conv: nn.Conv2d, binary: bool) -> Node:
        pad = list(conv.padding)
        return ops.convolution(x, self.weights(conv.weight, binary), list(conv.stride), pad, pad, [1, 1]).output(0)

    def sign(self, x: Node) -> Node:
        """binary_sign: +1 where x >= 0, else -1."""
        return ops.select(ops.greater_equal(x, self.constant(0.0)), self.constant(1.0), self.constant(-1.0)).output(0)

    def block(self, x: Node, block: BinaryBlock, index: int) -> Node:
        """bias_a -> sign -> BinaryConvolution -> padding correction -> one multiply-add (alpha,
        scale, BN), + shortcut, then bias_b -> PReLU (or ReLU) -> bias_c."""
        a = ops.add(x, self.per_channel(block.bias_a.bias.flatten())).output(0) if self.model.learnable_bias else x
        a.get_tensor().add_names({SIGN_INPUT.format(index)})
        signs, alpha = split_binary(block.conv.weight)
        stride = block.conv.stride[0]
        if self.binary:
            bits = bit_constant(signs, "little")
            y = ops.binary_convolution(self.sign(a), bits, [stride, stride], [1, 1], [1, 1], [1, 1],
                                       "xnor-popcount", PAD_VALUE)
            y = ops.subtract(y, self.padding_correction(bits, tuple(block.conv.weight.shape), spatial(x), stride))
        else:
            weights = self.constant(signs.float() * 2 - 1)
            y = ops.convolution(self.sign(a), weights, [stride, stride], [1, 1], [1, 1], [1, 1])
        k, b = batchnorm_affine(block.bn)
        scale = block.scale.scale.detach().flatten() if self.model.scale else torch.ones_like(k)
        out = self.multiply_add(y, alpha * scale * k, b)
        shortcut = x
        if isinstance(block.shortcut, nn.Sequential):
            pool, conv, bn = block.shortcut
            kernel = [pool.kernel_size] * 2
            pooled = ops.avg_pool(x, kernel, [0, 0], [0, 0], kernel, True, "floor").output(0)
            shortcut = self.multiply_add(self.float_conv(pooled, conv, self.model.binary_bottleneck),
                                         *batchnorm_affine(bn))
        out = ops.add(out, shortcut)
        if self.model.learnable_bias:
            out = ops.add(out, self.per_channel(block.bias_b.bias.flatten()))
        if self.model.activation == "prelu":
            out = ops.prelu(out, self.constant(block.activation.weight))
        else:
            out = ops.relu(out)
        if self.model.learnable_bias:
            out = ops.add(out, self.per_channel(block.bias_c.bias.flatten()))
        return out.output(0)

    def network(self, network: BinaryResNet20, input_shape: list[int]) -> ov.Model:
        """The OpenVINO model of `network`: input `images` (normalised NCHW float32), output `logits`."""
        images = ops.parameter(input_shape, ov.Type.f32, name="images")
        images.output(0).get_tensor().set_names({"images"})
        stem_conv, stem_bn, stem_pool = network.stem
        x = self.multiply_add(self.float_conv(images.output(0), stem_conv, self.model.binary_first_last),
                              *batchnorm_affine(stem_bn))
        pad = [stem_pool.padding] * 2
        x = ops.max_pool(x, [stem_pool.stride] * 2, pad, pad, [stem_pool.kernel_size] * 2, "floor").output(0)
        for index, block in enumerate(network.blocks):
            x = self.block(x, block, index)
        pooled = ops.reduce_mean(x, self.constant([2, 3], np.int64), False)
        weights = self.weights(network.classifier.weight, self.model.binary_first_last)
        logits = ops.add(ops.matmul(pooled, weights, False, True), self.constant(network.classifier.bias)).output(0)
        logits.get_tensor().set_names({"logits"})
        return ov.Model([logits], [images], "bnew-binary-resnet20")


# --- files ----------------------------------------------------------------------------------
@dataclass
class Export:
    """An exported network: its folder and the manifest written beside the IR."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def xml(self) -> Path:
        return self.folder / XML_FILE

    @property
    def bin(self) -> Path:
        return self.folder / BIN_FILE


def trial_data(config: TrialConfig) -> ImageData:
    """The trial's dataset with its whole test split (the normalisation comes from its training
    split, as in training)."""
    return load_data(config.data.model_copy(update={"test_limit": None}))


def binary_weight_count(network: nn.Module) -> int:
    return sum(weight.numel() for weight in network.binary_weights())


def write_json_atomic(payload: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)


def export_model(model_path: Path, folder: Path, run_id: str | None = None, data: ImageData | None = None) -> Export:
    """Write `model.xml`, `model.bin` and `export.json` (+ its `.sha256`) for the trial's `model.pt`
    into `folder`. `data`: the trial's dataset if loaded already (for the normalisation)."""
    trained = load_trained(model_path)
    refusal = export_refusal(trained)
    if refusal is not None:
        raise BnewError(f"export: {model_path}: {refusal}")
    data = data if data is not None else trial_data(trained.config)
    size = tuple(data.test.images.shape[-2:])
    model = IRBuilder(trained.config).network(trained.network, [1, trained.in_channels, *size])
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export-") as staging:
        ov.save_model(model, str(Path(staging) / XML_FILE), compress_to_fp16=False)
        for name in (XML_FILE, BIN_FILE):
            os.replace(Path(staging) / name, folder / name)
    bits = binary_weight_count(trained.network)
    manifest = {
        "format": EXPORT_FORMAT,
        "files": {name: {"sha256": sha256(folder / name), "bytes": (folder / name).stat().st_size}
                  for name in (XML_FILE, BIN_FILE)},
        "source": {"model_sha256": sha256(model_path), "mlflow_run_id": run_id},
        "architecture": trained.config.model.model_dump(mode="json"),
        "dataset": trained.config.data.name,
        "num_classes": trained.num_classes,
        "input": {
            "name": "images", "shape": [1, trained.in_channels, *size], "layout": "NCHW", "element_type": "f32",
            "normalisation": {"mean": data.mean.tolist(), "std": data.std.tolist(),
                              "formula": "(pixel - mean) / std per channel, pixels in 0..255"},
            "batch": "1 in the file; reshape the model to another batch before compiling",
        },
        "output": {"name": "logits", "shape": [1, trained.num_classes]},
        "binary_weights": {"count": bits, "bytes": bits // 8, "float32_bytes": 4 * bits},
        "runtime": {"openvino": ov.get_version(), "config": RUNTIME_CONFIG},
        "config": trained.config.model_dump(mode="json"),
    }
    write_json_atomic(manifest, folder / MANIFEST_FILE)
    write_checksum(folder / MANIFEST_FILE)
    return Export(folder, manifest)


def read_export(folder: Path) -> Export:
    """The manifest of an exported folder, with `model.xml` and `model.bin` checked against it:
    a missing, tampered or truncated file raises a one-line `BnewError`."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BnewError(f"export: {path} does not exist (not an exported folder?)")
    verify_checksum(path, "export", required=True)  # a one-line CorruptCheckpointError (a BnewError)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BnewError(f"export: {path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise BnewError(f"export: {path} is not a {EXPORT_FORMAT} manifest")
    for name in (XML_FILE, BIN_FILE):
        file = folder / name
        if not file.is_file():
            raise BnewError(f"export: {file} is missing")
        if sha256(file) != manifest["files"][name]["sha256"]:
            raise BnewError(f"export: {file} does not match the sha256 in {MANIFEST_FILE} (tampered or truncated)")
    return Export(folder, manifest)


def compile_export(export: Export, batch: int, threads: int | None = None,
                   extra_outputs: Iterable[str] = ()) -> ov.CompiledModel:
    """The exported network compiled for OpenVINO's CPU plugin at batch size `batch`, with the
    tensors named in `extra_outputs` as outputs besides the logits."""
    core = ov.Core()
    model = core.read_model(str(export.xml), str(export.bin))
    if extra_outputs:
        model.add_outputs(list(extra_outputs))
    model.reshape({"images": [batch, *export.manifest["input"]["shape"][1:]]})
    config = dict(RUNTIME_CONFIG, **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
    return core.compile_model(model, "CPU", config)


def u1_bytes(export: Export) -> int:
    """Bytes of the IR's `u1` constants (the binary weights), as OpenVINO reads them from model.bin."""
    model = ov.Core().read_model(str(export.xml), str(export.bin))
    return sum(op.get_byte_size() for op in model.get_ops()
               if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.u1)


# --- the check --------------------------------------------------------------------------------
@dataclass
class ExportCheck:
    """The exported network against the PyTorch one on a whole test split."""

    images: int
    agreeing: int
    """Images whose top-1 class is the same in both."""
    tied: int
    """Images where a value entering a sign within TIE_DISTANCE of 0 fell on the other side of 0
    in OpenVINO (where the two first differ); everything after that point differs as it may."""
    unexplained: int
    """Images where a sign differs first at a value farther from 0, or whose top-1 class differs
    without a tie: the check fails with any."""
    max_logit_diff: float
    """Largest |logit difference| over the images without a tie."""
    binary_bytes: int
    """Bytes of the IR's 1-bit constants."""
    binary_bits: int
    """Binary weights of the PyTorch network."""

    @property
    def passed(self) -> bool:
        return (self.unexplained == 0 and self.max_logit_diff < LOGIT_TOLERANCE
                and self.binary_bytes * 8 == self.binary_bits)

    @property
    def agreement(self) -> float:
        """Top-1 agreement in %."""
        return 100.0 * self.agreeing / self.images

    def metrics(self) -> dict[str, float]:
        return {"top1_agreement": self.agreement, "max_logit_diff": self.max_logit_diff, "tied_images": self.tied,
                "unexplained_images": self.unexplained}

    def line(self) -> str:
        return (f"top-1 agreement {self.agreement:.2f}% ({self.images} images), max |logit diff| {self.max_logit_diff:.2g}, "
                f"binary weights {self.binary_bytes} bytes ({4 * self.binary_bits} bytes as float32); "
                f"{self.tied} images with a sign input within {TIE_DISTANCE:g} of 0 on the other side"
                + (f", {self.unexplained} unexplained" if self.unexplained else ""))


def pytorch_sign_inputs(network: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits and, block by block, the values entering each sign."""
    inputs: list[torch.Tensor] = []
    signs = [module for module in network.modules() if isinstance(module, SignActivation)]
    hooks = [module.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for module in signs]
    try:
        with torch.no_grad():
            logits = network(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, inputs


def first_divergence(torch_inputs: list[torch.Tensor],
                     runtime_inputs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (tied: the first block whose signs differ differs only at values within
    TIE_DISTANCE of 0; far: it differs at a value farther from 0). Blocks after the first
    difference see other inputs and are not compared."""
    count = len(torch_inputs[0])
    diverged = torch.zeros(count, dtype=torch.bool)
    tied, far = diverged.clone(), diverged.clone()
    for expected, actual in zip(torch_inputs, runtime_inputs, strict=True):
        differs = ((expected >= 0) != (actual >= 0)).flatten(1)
        near = (expected.abs() < TIE_DISTANCE).flatten(1)
        fresh = differs.any(1) & ~diverged
        tied |= fresh & ~(differs & ~near).any(1)
        far |= fresh & (differs & ~near).any(1)
        diverged |= fresh
    return tied, far


def batches(data: ImageData, config: TrialConfig, batch_size: int) -> Iterator[torch.Tensor]:
    """The test split's images, normalised as in training, in order."""
    loader = BatchLoader(data.train, data, config.data, 1, 0)
    for images, _ in eval_batches(data.test, loader, batch_size):
        yield images


def compare(network: BinaryResNet20, export: Export, image_batches: Iterable[torch.Tensor]) -> ExportCheck:
    """Run the batches through the PyTorch network (eval mode) and through the exported one in
    OpenVINO, and compare logits, top-1 classes and every value entering a sign."""
    blocks = len(network.blocks)
    compiled: dict[int, ov.CompiledModel] = {}
    images_seen = agreeing = tied_count = unexplained = 0
    max_diff = 0.0
    for images in image_batches:
        logits, torch_inputs = pytorch_sign_inputs(network, images)
        if len(images) not in compiled:
            compiled[len(images)] = compile_export(export, len(images), extra_outputs=[
                SIGN_INPUT.format(index) for index in range(blocks)])
        model = compiled[len(images)]
        results = model(images.numpy())
        runtime_logits = torch.from_numpy(results[model.output("logits")])
        runtime_inputs = [torch.from_numpy(results[model.output(SIGN_INPUT.format(index))]) for index in range(blocks)]
        tied, far = first_divergence(torch_inputs, runtime_inputs)
        same = logits.argmax(1) == runtime_logits.argmax(1)
        images_seen += len(images)
        agreeing += int(same.sum())
        tied_count += int(tied.sum())
        unexplained += int((far | (~same & ~tied)).sum())
        if (~tied).any():
            max_diff = max(max_diff, float((logits[~tied] - runtime_logits[~tied]).abs().max()))
    return ExportCheck(images_seen, agreeing, tied_count, unexplained, max_diff, u1_bytes(export),
                       binary_weight_count(network))


def check_export(model_path: Path, export: Export, data: ImageData | None = None,
                 batch_size: int = 500) -> ExportCheck:
    """`compare` on the whole test split of the trial's dataset, with the model's final binary weights."""
    trained = load_trained(model_path)
    data = data if data is not None else trial_data(trained.config)
    return compare(trained.network, export, batches(data, trained.config, batch_size))
