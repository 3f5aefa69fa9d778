"""Built-in models: factories with keyword arguments and sane defaults, named by a model spec.

Every model starts by reshaping its input so that it accepts image batches ``(N, C, H, W)``; the
convolutional ones also take ``(N, H, W)`` (one channel) and flattened square images
``(N, C*H*W)``, as tabular data sets of small images (8x8 digits) often store them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}


class ToImage(nn.Module):
    """Reshape ``(N, C*H*W)`` square images or ``(N, H, W)`` ones to ``(N, C, H, W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return x
        if x.dim() == 3 and self.channels == 1:
            return x.unsqueeze(1)
        if x.dim() == 2 and x.shape[1] % self.channels == 0:
            pixels = x.shape[1] // self.channels
            side = int(math.sqrt(pixels) + 0.5)
            if side * side == pixels:
                return x.reshape(x.shape[0], self.channels, side, side)
        raise ValueError(
            f"expected images (N, {self.channels}, H, W) or flattened square ones, "
            f"got shape {list(x.shape)}"
        )

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def mlp(
    in_features: int = 64,
    hidden: int | Sequence[int] = (128, 128),
    num_classes: int = 10,
    activation: str = "relu",
) -> nn.Sequential:
    """A multilayer perceptron: flatten, then Linear layers of widths ``hidden`` and the classes."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    widths = [in_features, *([hidden] if isinstance(hidden, int) else hidden)]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), ACTIVATIONS[activation]()]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)


def _conv_bn_relu(fan_in: int, fan_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(fan_out),
        nn.ReLU(),
    ]


def cnn(in_channels: int = 1, num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """A small CNN with BatchNorm: three 3x3 conv blocks (the second strided), global average
    pooling and a linear head; works on any image size from 8x8 (digits) to 32x32 and beyond."""
    return nn.Sequential(
        ToImage(in_channels),
        *_conv_bn_relu(in_channels, width),
        *_conv_bn_relu(width, 2 * width, stride=2),
        *_conv_bn_relu(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


class BasicBlock(nn.Module):
    """The ResNet basic block: two 3x3 convolutions with BatchNorm and a (projected) shortcut."""

    def __init__(self, fan_in: int, fan_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(fan_in, fan_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(fan_out)
        self.conv2 = nn.Conv2d(fan_out, fan_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(fan_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or fan_in != fan_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(fan_in, fan_out, 1, stride=stride, bias=False), nn.BatchNorm2d(fan_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem without max pooling, basic blocks [2, 2, 2, 2] at
    64/128/256/512 channels, global average pooling, linear head (11.17M parameters)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.reshape = ToImage(in_channels)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        widths = [64, 128, 256, 512]
        self.layer1 = self._stage(64, widths[0], stride=1)
        self.layer2 = self._stage(widths[0], widths[1], stride=2)
        self.layer3 = self._stage(widths[1], widths[2], stride=2)
        self.layer4 = self._stage(widths[2], widths[3], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    @staticmethod
    def _stage(fan_in: int, fan_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(fan_in, fan_out, stride), BasicBlock(fan_out, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(self.reshape(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.pool(out), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet18:
    """CIFAR-style ResNet-18 (32x32 inputs; any size works thanks to global pooling)."""
    return ResNet18(num_classes=num_classes, in_channels=in_channels)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "cnn": cnn,
    "resnet18": resnet18,
}
