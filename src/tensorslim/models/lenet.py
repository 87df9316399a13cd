"""LeNet-5 (LeCun et al. 1998) for 28x28 inputs."""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.models.registry import register_model

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """Classic LeNet-5 with ReLU and max pooling.

    Shapes for a ``(N, C, 28, 28)`` input::

        conv1 (C->6, 5x5, pad 2) -> relu -> maxpool 2   : (N, 6, 14, 14)
        conv2 (6->16, 5x5)       -> relu -> maxpool 2   : (N, 16, 5, 5)
        avgpool (adaptive 5x5; identity at 28x28)       : (N, 16, 5, 5)
        flatten                                          : (N, 400)
        fc1 (400->120) -> relu -> fc2 (120->84) -> relu  : (N, 84)
        fc3 (84->num_classes)                            : (N, num_classes)

    The adaptive pool lets other input sizes (e.g. 32x32, any side >= 10) reach ``fc1`` with
    400 features; at 28x28 it does nothing. Attribute names ``conv1, conv2, fc1, fc2, fc3``
    are stable: benchmarks replace ``conv2``, ``fc1`` and ``fc2`` by name.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, kernel_size=5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d((5, 5))
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``."""
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(self.avgpool(x))
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


@register_model
def lenet5(in_channels: int = 1, num_classes: int = 10) -> LeNet5:
    """LeNet-5 (~61.7k parameters for 1 channel, 10 classes); see :class:`LeNet5`."""
    return LeNet5(in_channels=in_channels, num_classes=num_classes)
