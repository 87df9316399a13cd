"""Low-rank layers from a truncated SVD of a trained weight.

``LowRankLinear``: W (out × in) ≈ U Vᵀ with U (out × r), V (in × r); x → Vᵀx → U(Vᵀx) + b,
two ``nn.Linear`` layers ``down`` (in → r) and ``up`` (r → out). FLOPs per token 2·r·(in + out)
instead of 2·in·out; parameters r·(in + out) (+ out bias).

``LowRankConv2d`` for a kernel K (n, c, kh, kw), stride (sh, sw), padding (ph, pw), dilation
(dh, dw), output Ho × Wo on input H × W:

- scheme ``"channel"``: ``down`` = conv c→r, kh×kw (stride, padding, dilation), ``up`` = 1×1 conv
  r→n (+bias). FLOPs 2·Ho·Wo·r·(c·kh·kw + n); params r·(c·kh·kw + n).
- scheme ``"spatial"``: ``down`` = conv c→r, kh×1 (stride (sh, 1), padding (ph, 0), dilation
  (dh, 1)); ``up`` = conv r→n, 1×kw (stride (1, sw), padding (0, pw), dilation (1, dw)) (+bias).
  FLOPs 2·Ho·W·r·c·kh + 2·Ho·Wo·r·n·kw; params r·(c·kh + n·kw).

Singular values are split as √σ into both factors so they have the same scale (this keeps
fine-tuning well conditioned). At full rank both reproduce the dense layer to float tolerance.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.decompose.svd import (
    Scheme,
    SvdDriver,
    balanced_factors,
    conv_weight_to_matrix,
    matrix_to_conv_weight,
)
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer, dense_linear
from tensorslim.layers.conv_geometry import (
    conv_output_hw,
    dense_conv,
    geometry_of,
    pair,
    unsupported_conv_reason,
)
from tensorslim.layers.pointwise import PointwiseConv2d


def _check_rank(rank: int, full_rank: int, what: str) -> None:
    # bool is an int subclass: rank=True would silently mean rank 1
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise TensorslimError(f"rank {rank} is impossible for {what}: choose 1..{full_rank}")


class DownUp(StructuredLayer):
    """A layer computed as ``up(down(x))``: ``down`` maps to the rank, ``up`` (which holds the
    bias) maps back out; the low-rank Linear and convs share this forward."""

    down: nn.Module
    up: nn.Module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class LowRankLinear(DownUp):
    """x (…, in) → up(down(x)) (…, out) with ``down``: in→r (no bias), ``up``: r→out."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_rank(rank, min(in_features, out_features), f"Linear({in_features}, {out_features})")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_dense(
        cls, layer: nn.Linear, rank: int, scheme: str = "channel", driver: SvdDriver = "auto"
    ) -> LowRankLinear:
        """Truncated SVD of ``layer.weight`` (``scheme``: accepted for symmetry)."""
        _check_rank(
            rank,
            min(layer.in_features, layer.out_features),
            f"Linear({layer.in_features}, {layer.out_features})",
        )
        a, b = balanced_factors(layer.weight.detach(), rank, driver)
        return cls.from_factors(layer, a, b)

    @classmethod
    def from_factors(cls, layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
        """The layer W ≈ A Bᵀ for given factors A (out × r), B (in × r); ``layer``'s bias."""
        w = layer.weight.detach()
        rank = a.shape[1]
        if a.shape != (layer.out_features, rank) or b.shape != (layer.in_features, rank):
            raise TensorslimError(
                f"factors {tuple(a.shape)} and {tuple(b.shape)} do not fit Linear"
                f"({layer.in_features}, {layer.out_features}) at one rank"
            )
        new = cls(
            layer.in_features,
            layer.out_features,
            rank,
            layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            new.up.weight.copy_(a.to(w.dtype))
            new.down.weight.copy_(b.T.to(w.dtype))
            if layer.bias is not None:
                new.up.bias.copy_(layer.bias)
        return new

    def to_dense(self) -> nn.Linear:
        return dense_linear(self.up.weight @ self.down.weight, self.up.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        tokens = math.prod(input_shape[:-1])
        return 2 * tokens * self.rank * (self.in_features + self.out_features)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def extra_repr(self) -> str:
        return f"{self.in_features} → {self.rank} → {self.out_features}"


class LowRankConv2d(DownUp):
    """A Conv2d factorized channel-wise or spatial-wise (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        scheme: Scheme = "channel",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kh, kw = pair(kernel_size)
        sh, sw = pair(stride)
        dh, dw = pair(dilation)
        pad: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        if scheme == "channel":
            full = min(out_channels, in_channels * kh * kw)
        elif scheme == "spatial":
            full = min(out_channels * kw, in_channels * kh)
        else:
            raise TensorslimError(f"unknown SVD scheme '{scheme}': use 'channel' or 'spatial'")
        _check_rank(rank, full, f"a {scheme}-wise {out_channels}×{in_channels}×{kh}×{kw} conv")
        self.in_channels, self.out_channels, self.rank, self.scheme = (
            in_channels,
            out_channels,
            rank,
            scheme,
        )
        self.kernel_size, self.stride, self.dilation, self.padding = (
            (kh, kw),
            (sh, sw),
            (dh, dw),
            pad,
        )
        factory = {"device": device, "dtype": dtype}
        if scheme == "channel":
            self.down = nn.Conv2d(
                in_channels, rank, (kh, kw), (sh, sw), pad, (dh, dw), bias=False, **factory
            )
            self.up = PointwiseConv2d(rank, out_channels, bias=bias, **factory)
        else:
            pad_h: tuple[int, int] | str = pad if isinstance(pad, str) else (pad[0], 0)
            pad_w: tuple[int, int] | str = pad if isinstance(pad, str) else (0, pad[1])
            self.down = nn.Conv2d(
                in_channels, rank, (kh, 1), (sh, 1), pad_h, (dh, 1), bias=False, **factory
            )
            self.up = nn.Conv2d(
                rank, out_channels, (1, kw), (1, sw), pad_w, (1, dw), bias=bias, **factory
            )

    @classmethod
    def from_dense(
        cls,
        layer: nn.Conv2d,
        rank: int,
        scheme: Scheme = "channel",
        driver: SvdDriver = "auto",
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LowRankConv2d:
        """Factorize ``layer``'s kernel by a truncated SVD of its ``scheme`` matrix view, or
        load given balanced ``factors`` (A, B with A Bᵀ ≈ that matrix view)."""
        reason = unsupported_conv_reason(layer)
        if reason is not None:
            raise TensorslimError(f"cannot factorize this Conv2d: {reason}")
        w = layer.weight.detach()
        new = cls(rank=rank, scheme=scheme, **geometry_of(layer))
        n, c, kh, kw = w.shape
        if factors is None:
            factors = balanced_factors(conv_weight_to_matrix(w, scheme), rank, driver)
        a, b = factors
        with torch.no_grad():
            if scheme == "channel":
                new.down.weight.copy_(b.T.reshape(rank, c, kh, kw))
                new.up.weight.copy_(a.reshape(n, rank, 1, 1))
            else:
                # a rows are (n, w), b rows are (c, h)
                new.down.weight.copy_(b.T.reshape(rank, c, kh, 1))
                new.up.weight.copy_(a.reshape(n, kw, rank).permute(0, 2, 1).reshape(n, rank, 1, kw))
            if layer.bias is not None:
                new.up.bias.copy_(layer.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The product kernel (n, c, kh, kw)."""
        n, c, (kh, kw), r = self.out_channels, self.in_channels, self.kernel_size, self.rank
        if self.scheme == "channel":
            matrix = self.up.weight.reshape(n, r) @ self.down.weight.reshape(r, c * kh * kw)
        else:
            a = self.up.weight.reshape(n, r, kw).permute(0, 2, 1).reshape(n * kw, r)
            matrix = a @ self.down.weight.reshape(r, c * kh)
        return matrix_to_conv_weight(matrix, (n, c, kh, kw), self.scheme)

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self, self.dense_weight(), self.up.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-3])
        h, w = input_shape[-2:]
        kh, kw = self.kernel_size
        ho, wo = conv_output_hw((h, w), self.kernel_size, self.stride, self.padding, self.dilation)
        n, c, r = self.out_channels, self.in_channels, self.rank
        if self.scheme == "channel":
            return 2 * batch * ho * wo * r * (c * kh * kw + n)
        mid_w = conv_output_hw(
            (h, w), (kh, 1), (self.stride[0], 1), self.down.padding, (self.dilation[0], 1)
        )[1]
        return 2 * batch * ho * (mid_w * r * c * kh + wo * r * n * kw)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "scheme": self.scheme}

    def extra_repr(self) -> str:
        return f"{self.scheme}-wise, {self.in_channels} → {self.rank} → {self.out_channels}"
