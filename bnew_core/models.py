"""The ReActNet-style binary ResNet-20 of METHOD.md (one switch per ablation), its
real-valued variant, and the real-valued WRN-22-1 teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .binarise import SignActivation
from .checkpoint import MODEL_FORMAT, load_file
from .config import ModelConfig, TrialConfig, build_trial_config


class LearnableBias(nn.Module):
    """Per-channel additive bias (the shift of ReActNet's RSign and RPReLU)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class ChannelScale(nn.Module):
    """Learnable per-channel multiplier after a binary conv (the paper's parameter scaling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class PReLU(nn.PReLU):
    """nn.PReLU (same `weight` parameter) computed as relu(x) - w * relu(-x): the same values, and
    on the CPU about twice as fast as aten's prelu kernel, whose backward was 7% of a step. The
    gradient differs only at x == 0 exactly (0 here, w * grad in aten)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - self.weight.view(1, -1, 1, 1) * torch.relu(-x)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d that pools channels-last on the CPU, where the contiguous-format kernel is
    slower (stem's 128x16x32x32, one thread: 17 vs 13 ms forward+backward, 16 vs 5 ms in eval)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


def optional(enabled: bool, module: nn.Module) -> nn.Module:
    return module if enabled else nn.Identity()


class BinaryBlock(nn.Module):
    """bias_a -> sign -> 3x3 conv -> scale -> BN, + shortcut, then bias_b -> PReLU -> bias_c."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, config: ModelConfig) -> None:
        super().__init__()
        binary = not config.real_valued
        self.bias_a = optional(config.learnable_bias, LearnableBias(in_channels))
        self.sign = optional(binary, SignActivation(config.estimator))
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.scale = optional(config.scale, ChannelScale(out_channels))
        self.bn = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # The "bottleneck": 2x2 average pool, 1x1 conv, BN.
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride), nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        self.bias_b = optional(config.learnable_bias, LearnableBias(out_channels))
        self.activation = PReLU(out_channels) if config.activation == "prelu" else nn.ReLU()
        self.bias_c = optional(config.learnable_bias, LearnableBias(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.scale(self.conv(self.sign(self.bias_a(x))))) + self.shortcut(x)
        return self.bias_c(self.activation(self.bias_b(out)))


class BinaryResNet20(nn.Module):
    """Float stem (3x3 conv, BN, 3x3 max-pool /2), 3 stages x 6 binary blocks (16/32/64), float head."""

    def __init__(self, config: ModelConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), MaxPool2d(3, 2, 1)
        )
        blocks, channels = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for index in range(6):
                blocks.append(BinaryBlock(channels, width, stride if index == 0 else 1, config))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))

    def binary_weights(self) -> list[nn.Parameter]:
        """The weights phase 2 binarises, chosen by explicit flags (never by parameter names)."""
        if self.config.real_valued:
            return []
        weights = [block.conv.weight for block in self.blocks]
        if self.config.binary_bottleneck:
            weights += [block.shortcut[1].weight for block in self.blocks if isinstance(block.shortcut, nn.Sequential)]
        if self.config.binary_first_last:
            weights += [self.stem[0].weight, self.classifier.weight]
        return weights


class PreActBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv-BN-ReLU-conv, 1x1 conv shortcut on shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """Real-valued pre-activation WRN-depth-k teacher; WRN-22-1 has 3 blocks a stage at 16/32/64."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 22, width: int = 1) -> None:
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)]
        channels = 16
        for stage_width, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for index in range(blocks_per_stage):
                layers.append(PreActBlock(channels, stage_width, stride if index == 0 else 1))
                channels = stage_width
        layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def binary_weights(self) -> list[nn.Parameter]:
        return []


def build_model(config: ModelConfig, in_channels: int, num_classes: int) -> BinaryResNet20 | WideResNet:
    if config.arch == "wrn22_1":
        return WideResNet(in_channels, num_classes)
    return BinaryResNet20(config, in_channels, num_classes)


@dataclass
class TrainedModel:
    """A finished trial's `model.pt`: the network in eval mode, its config and data shape."""

    network: BinaryResNet20 | WideResNet
    config: TrialConfig
    in_channels: int
    num_classes: int
    path: Path


def load_trained(path: Path) -> TrainedModel:
    """The network of a trainer `model.pt`, in eval mode; a one-line `BnewError` if it cannot be read."""
    saved = load_file(path, MODEL_FORMAT, "model")
    config = build_trial_config(saved["config"], str(path))
    network = build_model(config.model, saved["in_channels"], saved["num_classes"])
    network.load_state_dict(saved["model"])
    return TrainedModel(network.eval(), config, saved["in_channels"], saved["num_classes"], path)
