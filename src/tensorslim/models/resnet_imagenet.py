"""ResNet for ImageNet-sized inputs, laid out as torchvision's (He et al. 2016), without it.

Module names match ``torchvision.models.resnet`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``), so plans read the same. ``width`` scales every channel
count (1.0 is the standard network; small widths make test-sized models).
"""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.models.registry import register_model

__all__ = ["Bottleneck", "ResNet", "ResNetBasicBlock", "resnet18", "resnet50"]


class ResNetBasicBlock(nn.Module):
    """Two 3×3 convs with a shortcut (ResNet-18/34); ``expansion`` 1."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (stride here, as torchvision's v1.5) → 1×1 expand ×4, with a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _downsample(inplanes: int, planes: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inplanes == planes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))


class ResNet(nn.Module):
    """(N, C, H, W) → 7×7/2 conv → 3×3/2 max pool → 4 stages (strides 1, 2, 2, 2) → global
    average pool → ``fc`` logits (N, num_classes)."""

    def __init__(
        self,
        block: type[ResNetBasicBlock] | type[Bottleneck],
        layers: list[int],
        in_channels: int = 3,
        num_classes: int = 1000,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise TensorslimError(f"resnet width must be > 0, got {width}; pass e.g. 0.25")
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        for i, (planes, count) in enumerate(zip(widths, layers, strict=True)):
            self.add_module(f"layer{i + 1}", self._stage(block, planes, count, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _stage(self, block: type, planes: int, count: int, stride: int) -> nn.Sequential:
        blocks = [block(self.inplanes, planes, stride)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(count - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18(in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet-18 (11.7M parameters at width 1 with 3 input channels, 1000 classes)."""
    return ResNet(ResNetBasicBlock, [2, 2, 2, 2], in_channels, num_classes, width)


@register_model
def resnet50(in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> ResNet:
    """ResNet-50, torchvision's v1.5 layout (25.6M parameters at width 1, RGB, 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes, width)
