"""ImageNet-style ResNet-18/34 (He et al. 2016, table 1), laid out like torchvision's.

Module names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``,
``fc``) so plans read the same. Shapes for a ``(N, C, 224, 224)`` input::

    conv1 7×7/2 + bn1 + relu, maxpool 3×3/2 : (N, 64, 56, 56)
    layer1 (BasicBlock ×2 | ×3)             : (N, 64, 56, 56)
    layer2 (first block stride 2)          : (N, 128, 28, 28)
    layer3                                  : (N, 256, 14, 14)
    layer4                                  : (N, 512, 7, 7)
    avgpool + flatten + fc                  : (N, num_classes)

Conv weights use Kaiming-normal (fan_out, ReLU) init, BatchNorm weight 1 / bias 0. The zoo
convention holds: 1 input channel and 10 classes unless given (ImageNet: 3 and 1000).
"""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.models.registry import register_model

__all__ = ["ImageNetBasicBlock", "ResNetImageNet", "resnet18", "resnet34"]


class ImageNetBasicBlock(nn.Module):
    """conv3×3(stride)+BN+ReLU, conv3×3+BN, plus the shortcut (1×1 conv+BN when shapes change)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_planes, H, W)`` → ``(N, planes, ⌈H/stride⌉, ⌈W/stride⌉)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetImageNet(nn.Module):
    """A 7×7 stem, max-pool, four stages of basic blocks (64, 128, 256, 512), avg-pool, ``fc``."""

    def __init__(
        self, blocks: tuple[int, int, int, int], in_channels: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, planes_in = [], 64
        for i, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stride = 1 if i == 0 else 2
            layers = [ImageNetBasicBlock(planes_in, planes, stride)]
            layers += [ImageNetBasicBlock(planes, planes) for _ in range(count - 1)]
            stages.append(nn.Sequential(*layers))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_channels, H, W)`` → ``(N, num_classes)`` logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register_model
def resnet18(in_channels: int = 1, num_classes: int = 10) -> ResNetImageNet:
    """ResNet-18: basic blocks (2, 2, 2, 2), 11.7M parameters, 3.6 GFLOPs at 224×224."""
    return ResNetImageNet((2, 2, 2, 2), in_channels, num_classes)


@register_model
def resnet34(in_channels: int = 1, num_classes: int = 10) -> ResNetImageNet:
    """ResNet-34: basic blocks (3, 4, 6, 3)."""
    return ResNetImageNet((3, 4, 6, 3), in_channels, num_classes)
