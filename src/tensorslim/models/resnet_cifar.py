"""CIFAR-style ResNets (He et al. 2016, section 4.2): resnet20/32/44/56."""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.models.registry import register_model

__all__ = ["BasicBlock", "ResNetCifar", "resnet20", "resnet32", "resnet44", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with a residual connection.

    Input ``(N, in_planes, H, W)`` -> output ``(N, planes, ceil(H/stride), ceil(W/stride))``.
    The ``shortcut`` is ``nn.Identity`` when shapes match, otherwise a 1x1 conv (with ``stride``)
    + BN (the paper's option B), so the whole block is made of plain ``nn`` modules.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, in_planes, H, W)`` -> ``(N, planes, H', W')``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet of depth ``6n+2``: a 3x3 stem conv, 3 stages of ``n`` blocks, avg pool, ``fc``.

    Shapes for a ``(N, C, 32, 32)`` input (28x28 gives 28 -> 14 -> 7)::

        conv1 + bn1 + relu  : (N, 16, 32, 32)
        layer1 (n blocks)   : (N, 16, 32, 32)
        layer2 (n blocks)   : (N, 32, 16, 16)   first block stride 2
        layer3 (n blocks)   : (N, 64, 8, 8)     first block stride 2
        avgpool + flatten   : (N, 64)
        fc                  : (N, num_classes)

    Conv weights use Kaiming-normal (fan_out, ReLU) init, BN starts at weight 1 / bias 0,
    ``fc`` keeps torch's default init; all drawn from torch's global RNG.
    """

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise TensorslimError(
                f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}"
            )
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """``blocks`` BasicBlocks; only the first changes width/resolution."""
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model
def resnet20(in_channels: int = 1, num_classes: int = 10) -> ResNetCifar:
    """ResNet-20 (n=3, ~0.27M parameters); see :class:`ResNetCifar`."""
    return ResNetCifar(20, in_channels=in_channels, num_classes=num_classes)


@register_model
def resnet32(in_channels: int = 1, num_classes: int = 10) -> ResNetCifar:
    """ResNet-32 (n=5, ~0.47M parameters); see :class:`ResNetCifar`."""
    return ResNetCifar(32, in_channels=in_channels, num_classes=num_classes)


@register_model
def resnet44(in_channels: int = 1, num_classes: int = 10) -> ResNetCifar:
    """ResNet-44 (n=7, ~0.66M parameters); see :class:`ResNetCifar`."""
    return ResNetCifar(44, in_channels=in_channels, num_classes=num_classes)


@register_model
def resnet56(in_channels: int = 1, num_classes: int = 10) -> ResNetCifar:
    """ResNet-56 (n=9, ~0.86M parameters); see :class:`ResNetCifar`."""
    return ResNetCifar(56, in_channels=in_channels, num_classes=num_classes)
