"""Tucker-2-decomposed Conv2d (Kim et al., ICLR 2016).

A kernel K (n, c, kh, kw) is approximated on its two channel modes:

    K[o, i, y, x] ≈ Σ_{p, q} U_out[o, p] · G[p, q, y, x] · U_in[i, q],

with U_out (n × R_out), U_in (c × R_in) orthonormal (HOSVD, optionally refined by HOOI) and the
core G (R_out, R_in, kh, kw). Applied as three convolutions:

1. ``first``: 1×1 conv c → R_in (weight U_inᵀ, no bias);
2. ``core``: kh×kw conv R_in → R_out (weight G) with the original stride, padding, dilation and
   padding mode (a 1×1 channel map commutes with any per-channel padding);
3. ``last``: 1×1 conv R_out → n (weight U_out) with the original bias.

At full ranks (R_out = n, R_in = c) the bases are square orthogonal and the layer reproduces the
dense convolution exactly (to float round-off).

FLOPs (2 per multiply-add) for an input (B, c, H, W) with output (B, n, Ho, Wo):
    2·B·(H·W·c·R_in + Ho·Wo·R_in·R_out·kh·kw + Ho·Wo·R_out·n)
against 2·B·Ho·Wo·n·c·kh·kw dense. Parameters c·R_in + R_in·R_out·kh·kw + R_out·n (+ n bias).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.decompose.tucker import TuckerResult, partial_tucker
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.conv_geometry import conv_output_hw, dense_conv, geometry_of, pair
from tensorslim.layers.cp import PADDING_MODES, conv_structure_reason
from tensorslim.layers.pointwise import PointwiseConv2d


class TuckerConv2d(StructuredLayer):
    """Conv2d as 1×1 (c→R_in) → kh×kw core (R_in→R_out) → 1×1 (R_out→n)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank_out: int,
        rank_in: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value, limit in (
            ("rank_out", rank_out, out_channels),
            ("rank_in", rank_in, in_channels),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise TensorslimError(
                    f"Tucker-2 {name}={value!r} is impossible for a conv {in_channels}→"
                    f"{out_channels}: choose 1..{limit}"
                )
        if padding_mode not in PADDING_MODES:
            raise TensorslimError(f"padding_mode '{padding_mode}': use one of {PADDING_MODES}")
        kh, kw = pair(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.rank_out, self.rank_in = rank_out, rank_in
        self.kernel_size, self.stride, self.dilation = (kh, kw), pair(stride), pair(dilation)
        self.padding: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode = padding_mode
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = PointwiseConv2d(in_channels, rank_in, bias=False, **factory)
        self.core = nn.Conv2d(
            rank_in,
            rank_out,
            (kh, kw),
            self.stride,
            self.padding,
            self.dilation,
            bias=False,
            padding_mode=padding_mode,
            **factory,
        )
        self.last = PointwiseConv2d(rank_out, out_channels, bias=bias, **factory)

    @classmethod
    def from_dense(
        cls,
        layer: nn.Conv2d,
        rank_out: int,
        rank_in: int,
        hooi_iters: int = 0,
        result: TuckerResult | None = None,
        hooi_tol: float = 1e-7,
    ) -> TuckerConv2d:
        """Tucker-2 (HOSVD + ≤ ``hooi_iters`` HOOI sweeps, stopping once a sweep gains less than
        ``hooi_tol``) of ``layer.weight`` on modes (0, 1), or the given precomputed ``result``."""
        reason = conv_structure_reason(layer)
        if reason is not None:
            raise TensorslimError(f"cannot Tucker-decompose this layer: {reason}")
        w = layer.weight.detach()
        new = cls(rank_out=rank_out, rank_in=rank_in, **geometry_of(layer, padding_mode=True))
        if result is None:
            result = partial_tucker(
                w, (rank_out, rank_in), (0, 1), hooi_iters=hooi_iters, tol=hooi_tol
            )
        u_out, u_in = result.factors
        if tuple(u_out.shape) != (w.shape[0], rank_out) or tuple(u_in.shape) != (
            w.shape[1],
            rank_in,
        ):
            raise TensorslimError(
                f"Tucker result with factors {tuple(u_out.shape)}, {tuple(u_in.shape)} does not "
                f"fit ranks ({rank_out}, {rank_in}) of a {tuple(w.shape)} kernel"
            )
        with torch.no_grad():
            new.first.weight.copy_(u_in.T.reshape(rank_in, layer.in_channels, 1, 1))
            new.core.weight.copy_(result.core)
            new.last.weight.copy_(u_out.reshape(layer.out_channels, rank_out, 1, 1))
            if layer.bias is not None:
                new.last.bias.copy_(layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))

    def dense_weight(self) -> torch.Tensor:
        """K = G ×₀ U_out ×₁ U_in  (shape (n, c, kh, kw))."""
        return torch.einsum(
            "op,pqyx,qi->oiyx",
            self.last.weight.reshape(self.out_channels, self.rank_out),
            self.core.weight,
            self.first.weight.reshape(self.rank_in, self.in_channels),
        )

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self, self.dense_weight(), self.last.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-3])
        h, w = input_shape[-2:]
        kh, kw = self.kernel_size
        ho, wo = conv_output_hw((h, w), (kh, kw), self.stride, self.padding, self.dilation)
        n, c, ro, ri = self.out_channels, self.in_channels, self.rank_out, self.rank_in
        return 2 * batch * (h * w * c * ri + ho * wo * (ri * ro * kh * kw + ro * n))

    def config(self) -> dict[str, Any]:
        return {"rank_out": self.rank_out, "rank_in": self.rank_in}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} → {self.rank_in} → core {self.kernel_size[0]}×"
            f"{self.kernel_size[1]} → {self.rank_out} → {self.out_channels}"
        )
