"""Output sizes and argument normalisation for Conv2d-like layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorslimError


def pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    """``3`` → ``(3, 3)``; a 2-tuple is returned as is."""
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise TensorslimError(f"expected an int or a pair, got {value}")
    return (int(value[0]), int(value[1]))


def conv_output_hw(
    in_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a convolution (PyTorch's formula; 'same' keeps the size)."""
    if padding == "same":
        return in_hw
    pad = (0,) * len(in_hw) if padding == "valid" else padding
    return tuple(  # type: ignore[return-value]
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(in_hw, kernel, stride, pad, dilation, strict=True)
    )


def unsupported_conv_reason(conv: nn.Conv1d | nn.Conv2d) -> str | None:
    """Why a Conv1d/Conv2d cannot be factorized channel-/spatial-wise, or None if it can."""
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is kept dense"
    if conv.padding_mode != "zeros":
        return f"padding_mode '{conv.padding_mode}' is kept dense (only zero padding factorizes)"
    if conv.padding == "same" and any(s != 1 for s in conv.stride):
        return "padding='same' with stride > 1 is kept dense"
    return None


def dense_conv(geometry: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The dense ``nn.Conv2d`` equivalent of a structured conv layer.

    ``geometry`` carries the conv's ``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation`` (and ``padding_mode``, zeros when absent); ``weight``
    (n, c, kh, kw) and ``bias`` (n) are copied into the new layer (same device and dtype).
    """
    dense = nn.Conv2d(
        geometry.in_channels,
        geometry.out_channels,
        geometry.kernel_size,
        geometry.stride,
        geometry.padding,
        geometry.dilation,
        bias=bias is not None,
        padding_mode=getattr(geometry, "padding_mode", "zeros"),
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        dense.weight.copy_(weight.reshape(dense.weight.shape))
        if bias is not None:
            dense.bias.copy_(bias)
    return dense


def geometry_of(conv: nn.Module, *, padding_mode: bool = False) -> dict[str, Any]:
    """Keyword arguments that give a structured layer ``conv``'s geometry, bias and placement:
    in/out channels, kernel size, stride, padding, dilation (in/out features for an
    ``nn.Linear``), ``bias`` (whether it has one), the weight's device and dtype, and
    ``padding_mode`` for the layers that take it."""
    if isinstance(conv, nn.Linear):
        return {
            "in_features": conv.in_features,
            "out_features": conv.out_features,
            "bias": conv.bias is not None,
            "device": conv.weight.device,
            "dtype": conv.weight.dtype,
        }
    kwargs: dict[str, Any] = {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "bias": conv.bias is not None,
        "device": conv.weight.device,
        "dtype": conv.weight.dtype,
    }
    if padding_mode:
        kwargs["padding_mode"] = conv.padding_mode
    return kwargs
