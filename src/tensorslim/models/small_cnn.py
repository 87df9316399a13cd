"""A small VGG-style CNN for 28x28 inputs."""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.models.registry import register_model

__all__ = ["SmallCNN", "small_cnn"]


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    """3x3 conv (padding 1, no bias) + BatchNorm + ReLU; keeps H and W."""
    return [nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class SmallCNN(nn.Module):
    """VGG-style CNN: three conv stages, then a two-layer classifier. No dropout.

    Shapes for a ``(N, C, 28, 28)`` input and ``width=1``::

        features: [conv 32, conv 32, maxpool] -> (N, 32, 14, 14)
                  [conv 64, conv 64, maxpool] -> (N, 64, 7, 7)
                  [conv 128, maxpool]         -> (N, 128, 3, 3)
        avgpool (adaptive 3x3; identity at 28x28) -> (N, 128, 3, 3)
        classifier: flatten (N, 1152) -> Linear 256 -> ReLU -> Linear num_classes

    ``width`` scales every channel count and the hidden Linear width (rounded, at least 1).
    Any input side >= 8 works (the adaptive pool fixes the classifier input to 3x3).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if width <= 0:
            raise TensorslimError(f"small_cnn width must be > 0, got {width}; pass e.g. 0.5 or 2")

        def w(c: int) -> int:
            return max(1, round(c * width))

        c1, c2, c3, hidden = w(32), w(64), w(128), w(256)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            *_conv_bn_relu(c1, c1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2),
            *_conv_bn_relu(c2, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 3 * 3, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(N, in_channels, H, W)`` to logits ``(N, num_classes)``."""
        return self.classifier(self.avgpool(self.features(x)))


@register_model
def small_cnn(in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> SmallCNN:
    """Small VGG-style CNN (~0.4M parameters at width 1); see :class:`SmallCNN`."""
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
