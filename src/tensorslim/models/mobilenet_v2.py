"""MobileNetV2 (Sandler et al. 2018), laid out as torchvision's, without it.

Inverted residual blocks: 1×1 expansion (×t) → 3×3 depthwise (groups = channels) → 1×1
linear projection, with a shortcut when the shape is kept. Module names follow torchvision
(``features.N.conv.…``, ``classifier.1``). ``width`` is torchvision's ``width_mult``.
"""

from __future__ import annotations

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.models.registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s) of the paper's Table 2
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1)]
SETTINGS += [(6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(value: float, divisor: int = 8) -> int:
    """Channels rounded to a multiple of ``divisor``, never below 90 % of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    padding = (kernel - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """x → [1×1 expand → ReLU6] → 3×3 depthwise → ReLU6 → 1×1 project (+ x if shapes match)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = round(cin * expand)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [_conv_bn(cin, hidden, 1)] if expand != 1 else []
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """(N, C, H, W) → 3×3/2 stem → 17 inverted residual blocks → 1×1 conv to 1280·max(1, width)
    → global average pool → dropout → ``classifier.1`` logits."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 1000,
        width: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise TensorslimError(f"mobilenet_v2 width must be > 0, got {width}; pass e.g. 0.25")
        cin = _divisible(32 * width)
        last = _divisible(1280 * max(1.0, width))
        features: list[nn.Module] = [_conv_bn(in_channels, cin, 3, 2)]
        for t, c, n, s in SETTINGS:
            cout = _divisible(c * width)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


@register_model
def mobilenet_v2(in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> MobileNetV2:
    """MobileNetV2 (3.5M parameters at width 1 with 3 input channels, 1000 classes)."""
    return MobileNetV2(in_channels, num_classes, width)
