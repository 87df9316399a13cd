"""CP-decomposed Conv2d (Lebedev et al., ICLR 2015).

A kernel K (n, c, kh, kw) is approximated by R rank-one terms

    K[o, i, y, x] ≈ Σ_r A[o, r] · B[i, r] · H[y, r] · W[x, r],

which turns the convolution into four cheap ones, applied in order:

1. ``first``: 1×1 conv c → R (weight Bᵀ, no bias) — mixes input channels;
2. ``vertical``: depthwise kh×1 conv on R channels (weight Hᵀ) with stride (sh, 1), padding
   (ph, 0), dilation (dh, 1);
3. ``horizontal``: depthwise 1×kw conv on R channels (weight Wᵀ) with stride (1, sw), padding
   (0, pw), dilation (1, dw);
4. ``last``: 1×1 conv R → n (weight A) with the original bias.

Steps 2–3 are a separable filter per component, so together they equal the kh×kw
cross-correlation with H[:, r] W[:, r]ᵀ at the original stride, padding and dilation (each
spatial conv pads only its own axis, which also holds for reflect/replicate/circular padding
because those act per channel and per axis). The CP scale λ_r is spread as λ_r^{1/4} over the four
factors, so all four start with comparable norms for fine-tuning.

FLOPs (2 per multiply-add) for an input (B, c, H, W) with output (B, n, Ho, Wo):
    2·B·(H·W·c·R + Ho·W·R·kh + Ho·Wo·R·kw + Ho·Wo·R·n)
against 2·B·Ho·Wo·n·c·kh·kw dense. Parameters R·(c + kh + kw + n) (+ n bias).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tensorslim.decompose.cp import CPResult, cp_als
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.conv_geometry import conv_output_hw, dense_conv, geometry_of, pair
from tensorslim.layers.pointwise import PointwiseConv2d

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def split_padding(
    padding: int | tuple[int, int] | str,
) -> tuple[tuple[int, int] | str, tuple[int, int] | str]:
    """(padding of the kh×1 conv, padding of the 1×kw conv) for a separable split.

    'same'/'valid' pass through unchanged: with a kernel of width 1 along the other axis they pad
    only their own axis, exactly as the full kernel would.
    """
    if isinstance(padding, str):
        return padding, padding
    ph, pw = pair(padding)
    return (ph, 0), (0, pw)


def conv_structure_reason(conv: nn.Module) -> str | None:
    """Why a module cannot become a CP/Tucker conv, or None if it can."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not a Conv2d"
    if conv.groups != 1:
        return f"grouped conv (groups={conv.groups}) is kept dense"
    if conv.padding_mode not in PADDING_MODES:
        return f"padding_mode '{conv.padding_mode}' is not supported"
    return None


class CPConv2d(StructuredLayer):
    """Conv2d as 1×1 → depthwise kh×1 → depthwise 1×kw → 1×1 (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        rank: int,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise TensorslimError(f"CP rank must be a positive integer, got {rank!r}")
        if padding_mode not in PADDING_MODES:
            raise TensorslimError(f"padding_mode '{padding_mode}': use one of {PADDING_MODES}")
        kh, kw = pair(kernel_size)
        sh, sw = pair(stride)
        dh, dw = pair(dilation)
        pad: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.kernel_size, self.stride, self.dilation, self.padding = (
            (kh, kw),
            (sh, sw),
            (dh, dw),
            pad,
        )
        self.padding_mode = padding_mode
        pad_h, pad_w = split_padding(pad)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.first = PointwiseConv2d(in_channels, rank, bias=False, **factory)
        self.vertical = nn.Conv2d(
            rank,
            rank,
            (kh, 1),
            (sh, 1),
            pad_h,
            (dh, 1),
            groups=rank,
            bias=False,
            padding_mode=padding_mode,
            **factory,
        )
        self.horizontal = nn.Conv2d(
            rank,
            rank,
            (1, kw),
            (1, sw),
            pad_w,
            (1, dw),
            groups=rank,
            bias=False,
            padding_mode=padding_mode,
            **factory,
        )
        self.last = PointwiseConv2d(rank, out_channels, bias=bias, **factory)

    @classmethod
    def from_dense(
        cls, layer: nn.Conv2d, rank: int, result: CPResult | None = None, **als: Any
    ) -> CPConv2d:
        """CP-ALS of ``layer.weight`` at ``rank`` (``als`` goes to :func:`cp_als`), or the given
        precomputed ``result`` (factors of shapes (n, R), (c, R), (kh, R), (kw, R))."""
        reason = conv_structure_reason(layer)
        if reason is not None:
            raise TensorslimError(f"cannot CP-decompose this layer: {reason}")
        w = layer.weight.detach()
        new = cls(rank=rank, **geometry_of(layer, padding_mode=True))
        if result is None:
            result = cp_als(w, rank, **als)
        if [f.shape for f in result.factors] != [(s, rank) for s in w.shape]:
            raise TensorslimError(
                f"CP result of shapes {[tuple(f.shape) for f in result.factors]} does not fit a "
                f"rank-{rank} decomposition of a {tuple(w.shape)} kernel"
            )
        new.load_factors(result.weights, result.factors)
        if layer.bias is not None:
            with torch.no_grad():
                new.last.bias.copy_(layer.bias)
        return new

    def load_factors(self, weights: torch.Tensor, factors: list[torch.Tensor]) -> None:
        """Set the four convs from λ (R,) and A (n, R), B (c, R), H (kh, R), W (kw, R)."""
        root = weights.clamp_min(0) ** 0.25
        a, b, h, w = (f * root for f in factors)
        n, c, (kh, kw), r = self.out_channels, self.in_channels, self.kernel_size, self.rank
        with torch.no_grad():
            self.first.weight.copy_(b.T.reshape(r, c, 1, 1))
            self.vertical.weight.copy_(h.T.reshape(r, 1, kh, 1))
            self.horizontal.weight.copy_(w.T.reshape(r, 1, 1, kw))
            self.last.weight.copy_(a.reshape(n, r, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def dense_weight(self) -> torch.Tensor:
        """K[o, i, y, x] = Σ_r A[o, r] B[i, r] H[y, r] W[x, r]  (shape (n, c, kh, kw))."""
        r = self.rank
        return torch.einsum(
            "or,ir,yr,xr->oiyx",
            self.last.weight.reshape(self.out_channels, r),
            self.first.weight.reshape(r, self.in_channels).T,
            self.vertical.weight.reshape(r, self.kernel_size[0]).T,
            self.horizontal.weight.reshape(r, self.kernel_size[1]).T,
        )

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self, self.dense_weight(), self.last.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-3])
        h, w = input_shape[-2:]
        kh, kw = self.kernel_size
        mid_h, mid_w = conv_output_hw(
            (h, w), (kh, 1), self.vertical.stride, self.vertical.padding, self.vertical.dilation
        )
        ho, wo = conv_output_hw(
            (mid_h, mid_w),
            (1, kw),
            self.horizontal.stride,
            self.horizontal.padding,
            self.horizontal.dilation,
        )
        n, c, r = self.out_channels, self.in_channels, self.rank
        return (
            2
            * batch
            * (h * w * c * r + mid_h * mid_w * r * kh + ho * wo * r * kw + ho * wo * r * n)
        )

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank}

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels} → CP rank {self.rank} ({self.kernel_size[0]}×"
            f"{self.kernel_size[1]}) → {self.out_channels}"
        )
