"""Low-rank ``nn.Conv1d`` from a truncated SVD of its kernel (the channel scheme in 1-D).

A kernel K (n, c, k) viewed as the matrix M = K (n × c·k) is factorized M ≈ U Vᵀ with U (n × r),
V (c·k × r): ``down`` = Conv1d c→r with the full k-tap kernel (the layer's stride, padding,
dilation), ``up`` = 1-tap Conv1d r→n (+bias). On an input (B, c, L) with output length Lo:
FLOPs 2·B·Lo·r·(c·k + n) instead of 2·B·Lo·n·c·k; parameters r·(c·k + n) (+n bias).
Singular values are split as √σ into both factors; at full rank the layer reproduces the dense
conv to float tolerance. (A 1-D kernel has no second spatial axis, so there is no spatial scheme.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.decompose.svd import SvdDriver, balanced_factors
from tensorslim.errors import TensorslimError
from tensorslim.layers.conv_geometry import conv_output_hw, unsupported_conv_reason
from tensorslim.layers.lowrank import DownUp


def _single(value: int | tuple[int, ...]) -> int:
    return int(value if isinstance(value, int) else value[0])


class LowRankConv1d(DownUp):
    """x (B, c, L) → up(down(x)) (B, n, Lo): ``down`` c→r (k taps), ``up`` r→n (1 tap)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        rank: int,
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | str = 0,
        dilation: int | tuple[int] = 1,
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        k = _single(kernel_size)
        full = min(out_channels, in_channels * k)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full:
            raise TensorslimError(
                f"rank {rank} is impossible for a {out_channels}×{in_channels}×{k} Conv1d: "
                f"choose 1..{full}"
            )
        pad: int | str = padding if isinstance(padding, str) else _single(padding)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride = (k,), (_single(stride),)
        self.dilation = (_single(dilation),)
        self.padding = pad if isinstance(pad, str) else (pad,)
        factory = {"device": device, "dtype": dtype}
        self.down = nn.Conv1d(
            in_channels, rank, k, self.stride, pad, self.dilation, bias=False, **factory
        )
        self.up = nn.Conv1d(rank, out_channels, 1, bias=bias, **factory)

    @classmethod
    def from_dense(
        cls,
        layer: nn.Conv1d,
        rank: int,
        driver: SvdDriver = "auto",
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LowRankConv1d:
        """Factorize ``layer``'s kernel by a truncated SVD of its (n × c·k) matrix view, or
        load given balanced ``factors`` (A (n × r), B (c·k × r), A Bᵀ ≈ the matrix)."""
        reason = unsupported_conv_reason(layer)
        if reason is not None:
            raise TensorslimError(f"cannot factorize this Conv1d: {reason}")
        w = layer.weight.detach()
        n, c, k = w.shape
        new = cls(
            c,
            n,
            k,
            rank,
            layer.stride,
            layer.padding,  # type: ignore[arg-type]
            layer.dilation,
            layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        if factors is None:
            factors = balanced_factors(w.reshape(n, c * k), rank, driver)
        a, b = factors
        with torch.no_grad():
            new.down.weight.copy_(b.T.reshape(rank, c, k))
            new.up.weight.copy_(a.reshape(n, rank, 1))
            if layer.bias is not None:
                new.up.bias.copy_(layer.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The product kernel (n, c, k)."""
        n, r = self.out_channels, self.rank
        matrix = self.up.weight.reshape(n, r) @ self.down.weight.reshape(r, -1)
        return matrix.reshape(n, self.in_channels, self.kernel_size[0])

    def to_dense(self) -> nn.Conv1d:
        w = self.down.weight
        dense = nn.Conv1d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,  # type: ignore[arg-type]
            self.dilation,
            bias=self.up.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.up.bias is not None:
                dense.bias.copy_(self.up.bias)
        return dense

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-2])
        (length,) = conv_output_hw(
            tuple(input_shape[-1:]),  # type: ignore[arg-type]
            self.kernel_size,  # type: ignore[arg-type]
            self.stride,  # type: ignore[arg-type]
            self.padding,  # type: ignore[arg-type]
            self.dilation,  # type: ignore[arg-type]
        )
        c, k, n = self.in_channels, self.kernel_size[0], self.out_channels
        return 2 * batch * length * self.rank * (c * k + n)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "scheme": "channel"}

    def extra_repr(self) -> str:
        return f"channel-wise 1-D, {self.in_channels} → {self.rank} → {self.out_channels}"
