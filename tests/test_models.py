"""Model shapes, parameter counts derived by hand, and the binary set of every ablation switch."""

from __future__ import annotations

import pytest
import torch

from bnew_core.binarise import SignActivation
from bnew_core.config import ModelConfig
from bnew_core.models import BinaryResNet20, WideResNet, build_model


def block_parameters(c_in: int, c_out: int, bias: bool = True, prelu: bool = True, scale: bool = True) -> int:
    """bias_a(c_in) + conv3x3 + scale + BN(2) + bias_b + PReLU + bias_c, + shortcut conv1x1 + BN on change."""
    count = 9 * c_in * c_out + 2 * c_out
    count += (c_in + 2 * c_out) * bias + c_out * prelu + c_out * scale
    if c_in != c_out:
        count += c_in * c_out + 2 * c_out
    return count


def resnet20_parameters(in_channels: int, classes: int, **switches: bool) -> int:
    stem = 9 * in_channels * 16 + 2 * 16
    widths = [16] * 7 + [32] * 6 + [64] * 6  # input width then the 18 blocks' widths
    blocks = sum(block_parameters(a, b, **switches) for a, b in zip(widths, widths[1:]))
    return stem + blocks + 64 * classes + classes


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet20_parameter_counts() -> None:
    assert resnet20_parameters(3, 10) == 275_786  # the hand sum of the formula, for the record
    assert count(build_model(ModelConfig(arch="resnet20"), 3, 10)) == 275_786
    assert count(build_model(ModelConfig(arch="resnet20"), 3, 100)) == resnet20_parameters(3, 100)
    no_bias = ModelConfig(arch="resnet20", learnable_bias=False)
    assert count(build_model(no_bias, 3, 10)) == resnet20_parameters(3, 10, bias=False)
    relu = ModelConfig(arch="resnet20", activation="relu")
    assert count(build_model(relu, 3, 10)) == resnet20_parameters(3, 10, prelu=False)
    no_scale = ModelConfig(arch="resnet20", scale=False)
    assert count(build_model(no_scale, 1, 10)) == resnet20_parameters(1, 10, scale=False)


def test_wrn22_1_parameter_count() -> None:
    # conv 3->16; 3 stages x 3 pre-activation blocks (BN, conv, BN, conv, 1x1 shortcut on change);
    # final BN and the classifier.
    def block(c_in: int, c_out: int) -> int:
        return 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + (c_in * c_out if c_in != c_out else 0)

    widths = [16] * 4 + [32] * 3 + [64] * 3
    expected = 9 * 3 * 16 + sum(block(a, b) for a, b in zip(widths, widths[1:])) + 2 * 64 + 64 * 10 + 10
    assert expected == 272_282
    assert count(WideResNet(3, 10)) == expected


BASE_BINARY = 267_264  # the 18 block 3x3 convs of METHOD.md


@pytest.mark.parametrize(
    "switches, extra",
    [
        ({}, 0),
        ({"binary_bottleneck": True}, 16 * 32 + 32 * 64),
        ({"binary_first_last": True}, 3 * 16 * 9 + 64 * 10),
        ({"binary_first_last": True, "binary_bottleneck": True}, 16 * 32 + 32 * 64 + 3 * 16 * 9 + 64 * 10),
        ({"learnable_bias": False, "activation": "relu", "scale": False, "estimator": "ste"}, 0),
    ],
)
def test_binary_weight_set_per_switch(switches: dict, extra: int) -> None:
    model = BinaryResNet20(ModelConfig(arch="resnet20", **switches), 3, 10)
    binary = model.binary_weights()
    assert sum(w.numel() for w in binary) == BASE_BINARY + extra
    assert len({id(w) for w in binary}) == len(binary)
    ids = {id(p) for p in model.parameters()}
    assert all(id(w) in ids for w in binary)
    binary_ids = {id(w) for w in binary}
    first_last = {id(model.stem[0].weight), id(model.classifier.weight)}
    assert first_last <= binary_ids if switches.get("binary_first_last") else not first_last & binary_ids


def test_real_valued_variant_has_no_sign_and_no_binary_weights() -> None:
    model = BinaryResNet20(ModelConfig(arch="resnet20", real_valued=True), 3, 100)
    assert model.binary_weights() == []
    assert not any(isinstance(m, SignActivation) for m in model.modules())
    assert WideResNet(3, 10).binary_weights() == []


def test_estimator_switch_reaches_every_block() -> None:
    model = BinaryResNet20(ModelConfig(arch="resnet20", estimator="ste"), 3, 10)
    estimators = {m.estimator for m in model.modules() if isinstance(m, SignActivation)}
    assert estimators == {"ste"}


@pytest.mark.parametrize("in_channels, size", [(1, 8), (3, 16), (3, 32)])
def test_models_accept_each_input_size(in_channels: int, size: int) -> None:
    for config in (ModelConfig(arch="resnet20"), ModelConfig(arch="wrn22_1")):
        out = build_model(config, in_channels, 7)(torch.randn(2, in_channels, size, size))
        assert out.shape == (2, 7)
