"""A 1×1 convolution that runs as a matrix product where PyTorch's CPU convolution is slow.

In the factorized layers a 1×1 conv often *expands* channels (rank r → n outputs, r < n). On
the CPU, PyTorch's NCHW convolution is pathologically slow for that shape: on this project's
2-core machine a (64, 6, 28, 28) → 32-channel 1×1 conv took 15 ms as a convolution and 0.4 ms as
``W (n×r) @ X (N, r, H·W)``; with 64 → 256 channels, 26 ms against 9 ms. A reducing 1×1 conv
(r ≥ n) and every channels_last input are as fast or faster as convolutions, so they stay one.

:class:`PointwiseConv2d` is an ``nn.Conv2d`` (same parameters, state-dict keys, FLOP count and
``isinstance`` checks); only its forward picks the faster kernel. The math is the same:
y[b, o, h, w] = Σ_i W[o, i] · x[b, i, h, w] + bias[o].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseConv2d", "pointwise_conv"]


def pointwise_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """1×1, stride-1, unpadded convolution of ``x`` (N, c, H, W) by ``weight`` (n, c, 1, 1)."""
    n, c = weight.shape[0], weight.shape[1]
    expands = c < n
    if x.dim() != 4 or not expands or not x.is_contiguous():
        # channels_last (not NCHW-contiguous), reducing convs and unbatched input: oneDNN is
        # fine there, and a matmul on channels_last would need a layout copy
        return F.conv2d(x, weight, bias)
    batch, _, height, width = x.shape
    y = torch.matmul(weight.reshape(n, c), x.reshape(batch, c, height * width))
    if bias is not None:
        y = y + bias.reshape(1, n, 1)
    return y.reshape(batch, n, height, width)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` whose forward uses :func:`pointwise_conv`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias)
