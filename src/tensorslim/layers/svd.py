"""Trainable SVD-form layers (Yang et al., CVPR-W 2020, "SVD training").

A dense weight, viewed as a matrix M (m × n), is held as its SVD factors

    M = U · diag(|s|) · Vᵀ,   U (m × r), s (r), V (n × r),  r = min(m, n) by default,

all three ``nn.Parameter``s, trained directly. The forward never forms M: it splits |s| as √|s|
into both factors, A = U·diag(√|s|) (m × k), B = V·diag(√|s|) (n × k), and runs two consecutive
layers with the k singular values still active (pruned ones are sliced out, not multiplied by 0,
so they cost nothing):

- ``SVDLinear`` (W out × in, m = out, n = in): y = (x · B) · Aᵀ + b.
  FLOPs 2·tokens·k·(in + out).
- ``SVDConv2d`` for a kernel K (n_out, c, kh, kw), stride (sh, sw), padding (ph, pw),
  dilation (dh, dw), output Ho × Wo on input H × W — the geometry of ``LowRankConv2d``:

  * scheme ``"channel"``: M = K viewed n_out × (c·kh·kw); conv c→k with kernel Bᵀ reshaped
    (k, c, kh, kw) (stride, padding, dilation), then 1×1 conv k→n_out with A (+bias).
    FLOPs 2·Ho·Wo·k·(c·kh·kw + n_out).
  * scheme ``"spatial"``: M[(n, w), (c, h)] = K[n, c, h, w], (n_out·kw) × (c·kh); conv c→k with a
    kh×1 kernel (stride (sh, 1), padding (ph, 0), dilation (dh, 1)), then conv k→n_out with a
    1×kw kernel (stride (1, sw), padding (0, pw), dilation (1, dw)) (+bias).
    FLOPs 2·Ho·W'·k·c·kh + 2·Ho·Wo·k·n_out·kw (W' the width after the first conv).

The paper's per-layer FLOPs ratio against the dense conv at stride 1 with 'same' padding is
(n + c·h·w)·k / (n·c·h·w) channel-wise and (n·w + c·h)·k / (n·c·h·w) spatial-wise.
Scaling the factors by √|s| is per weight, not per input, and is not counted.

A boolean buffer ``active`` (r) marks the singular values that survive pruning; it is saved
with the weights. ``to_lowrank()`` turns the layer into the foundation's truncated
``LowRankLinear``/``LowRankConv2d`` (weights A, B), ``to_dense()`` multiplies it out.
"""

from __future__ import annotations

import abc
import math
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.decompose.svd import (
    Scheme,
    SvdDriver,
    conv_weight_to_matrix,
    matrix_to_conv_weight,
    truncated_svd,
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
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear


def _resolve_rank(rank: int | None, full_rank: int, what: str) -> int:
    if rank is None:
        return full_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= full_rank:
        raise TensorslimError(
            f"rank {rank} is impossible for {what}: choose 1..{full_rank} (or None for full rank)"
        )
    return rank


class SVDLayer(StructuredLayer):
    """Shared machinery: the U, s, V parameters, the ``active`` mask and pruning."""

    U: nn.Parameter
    s: nn.Parameter
    V: nn.Parameter
    active: torch.Tensor

    @classmethod
    def from_shape(cls, *args: Any, **kwargs: Any) -> Self:
        """A freshly initialized layer for training from scratch: the constructor's arguments
        with ``init=True`` (a Kaiming-normal weight stored as its SVD)."""
        return cls(*args, init=True, **kwargs)

    def _init_factors(
        self, m: int, n: int, rank: int, device: torch.device | None, dtype: torch.dtype | None
    ) -> None:
        self.matrix_shape = (m, n)
        self.full_rank = min(m, n)
        self.rank = rank
        factory = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.zeros(m, rank, **factory))
        self.s = nn.Parameter(torch.zeros(rank, **factory))
        self.V = nn.Parameter(torch.zeros(n, rank, **factory))
        self.register_buffer("active", torch.ones(rank, dtype=torch.bool, device=device))

    # ----- the factors ------------------------------------------------------------------------
    def active_rank(self) -> int:
        """Number of singular values still in the forward."""
        return int(self.active.sum())

    def active_index(self) -> torch.Tensor | None:
        """Indices of the active singular values, or None when all are active."""
        if bool(self.active.all()):
            return None
        return torch.nonzero(self.active, as_tuple=False).squeeze(1)

    def active_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k (m × k), s_k (k), V_k (n × k)) restricted to the active singular values."""
        index = self.active_index()
        if index is None:
            return self.U, self.s, self.V
        return (
            self.U.index_select(1, index),
            self.s.index_select(0, index),
            self.V.index_select(1, index),
        )

    def balanced_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A = U_k·diag(√|s_k|) (m × k) and B = V_k·diag(√|s_k|) (n × k); A·Bᵀ is the weight."""
        u, s, v = self.active_factors()
        root = s.abs().sqrt()
        return u * root, v * root

    def weight_matrix(self) -> torch.Tensor:
        """The m × n matrix A·Bᵀ = U_k diag(|s_k|) V_kᵀ."""
        a, b = self.balanced_factors()
        return a @ b.T

    def singular_values(self) -> torch.Tensor:
        """|s| of the active singular values (detached), in storage order."""
        return self.active_factors()[1].detach().abs()

    # ----- pruning ----------------------------------------------------------------------------
    def set_active(self, mask: torch.Tensor) -> None:
        """Keep exactly the singular values where ``mask`` is True (at least one)."""
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self.active.device)
        if mask.shape != self.active.shape:
            raise TensorslimError(
                f"active mask has shape {tuple(mask.shape)}, the layer has rank {self.rank}"
            )
        if not bool(mask.any()):
            raise TensorslimError("cannot prune every singular value: keep at least rank 1")
        with torch.no_grad():
            self.active.copy_(mask)

    def keep_top(self, k: int) -> None:
        """Keep the ``k`` largest |s| among the active singular values, prune the rest."""
        current = self.active_rank()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= current:
            raise TensorslimError(f"cannot keep {k} singular values: choose 1..{current}")
        magnitude = self.s.detach().abs().masked_fill(~self.active, -1.0)
        top = torch.topk(magnitude, k).indices
        mask = torch.zeros_like(self.active)
        mask[top] = True
        self.set_active(mask)

    @torch.no_grad()
    def compact(self) -> None:
        """Drop the pruned singular values from the parameters (rank becomes the active rank).

        Parameters are replaced, so build the optimizer after calling this.
        """
        index = self.active_index()
        if index is None:
            return
        self.U = nn.Parameter(self.U.index_select(1, index).clone())
        self.s = nn.Parameter(self.s.index_select(0, index).clone())
        self.V = nn.Parameter(self.V.index_select(1, index).clone())
        self.rank = int(index.numel())
        self.active = torch.ones(self.rank, dtype=torch.bool, device=self.active.device)

    @torch.no_grad()
    def _fill_from_matrix(self, matrix: torch.Tensor, driver: SvdDriver = "auto") -> None:
        u, s, v = truncated_svd(matrix, self.rank, driver)
        self.U.copy_(u)
        self.s.copy_(s)
        self.V.copy_(v)
        self.active.fill_(True)

    def analytic_params(self) -> int:
        """Parameters that matter: k·(m + n + 1) for the active rank k, plus the bias."""
        m, n = self.matrix_shape
        bias = self.bias.numel() if getattr(self, "bias", None) is not None else 0
        return self.active_rank() * (m + n + 1) + bias

    @abc.abstractmethod
    def flops_at_rank(self, input_shape: tuple[int, ...], rank: int) -> int:
        """FLOPs of the two-layer forward with ``rank`` singular values kept."""

    @abc.abstractmethod
    def dense_flops(self, input_shape: tuple[int, ...]) -> int:
        """FLOPs of the equivalent dense layer on the same input."""

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        return self.flops_at_rank(input_shape, self.active_rank())

    def lowrank_pays(self, input_shape: tuple[int, ...], rank: int | None = None) -> bool:
        """True when the factorized form at ``rank`` (default: active) is cheaper than dense."""
        k = self.active_rank() if rank is None else rank
        return self.flops_at_rank(input_shape, k) < self.dense_flops(input_shape)

    def config(self) -> dict[str, Any]:
        return {"rank": self.rank, "scheme": self.scheme, "active_rank": self.active_rank()}


class SVDLinear(SVDLayer):
    """A Linear layer trained as U·diag(|s|)·Vᵀ with U (out × r), s (r), V (in × r)."""

    scheme = "channel"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | None = None,
        bias: bool = True,
        *,
        init: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``init=True`` draws a Kaiming-normal weight and stores its SVD (see ``from_shape``);
        ``init=False`` leaves zeros for a state dict to fill."""
        super().__init__()
        full = min(in_features, out_features)
        rank = _resolve_rank(rank, full, f"Linear({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        self._init_factors(out_features, in_features, rank, device, dtype)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        )
        if init:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-in, ReLU gain) dense weight → its SVD; bias U(±1/√fan_in)."""
        weight = torch.empty(self.out_features, self.in_features, device=self.U.device)
        nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")
        self._fill_from_matrix(weight.to(self.U.dtype))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls, layer: nn.Linear, rank: int | None = None, driver: SvdDriver = "auto"
    ) -> SVDLinear:
        """SVD of ``layer.weight`` (exact at full rank; truncated to ``rank`` otherwise)."""
        if not isinstance(layer, nn.Linear):
            raise TensorslimError(f"SVDLinear.from_dense needs an nn.Linear, got {type(layer)}")
        w = layer.weight.detach()
        new = cls(
            layer.in_features,
            layer.out_features,
            rank,
            layer.bias is not None,
            init=False,
            device=w.device,
            dtype=w.dtype,
        )
        new._fill_from_matrix(w, driver)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.balanced_factors()
        # two consecutive linear maps: in → k, then k → out (+bias)
        return F.linear(F.linear(x, b.T), a, self.bias)

    def flops_at_rank(self, input_shape: tuple[int, ...], rank: int) -> int:
        tokens = math.prod(input_shape[:-1])
        return 2 * tokens * rank * (self.in_features + self.out_features)

    def dense_flops(self, input_shape: tuple[int, ...]) -> int:
        return 2 * math.prod(input_shape[:-1]) * self.in_features * self.out_features

    def to_lowrank(self) -> LowRankLinear:
        """The truncated ``LowRankLinear`` at the active rank (down = Bᵀ, up = A, bias)."""
        a, b = (t.detach() for t in self.balanced_factors())
        new = LowRankLinear(
            self.in_features,
            self.out_features,
            a.shape[1],
            self.bias is not None,
            device=a.device,
            dtype=a.dtype,
        )
        with torch.no_grad():
            new.down.weight.copy_(b.T)
            new.up.weight.copy_(a)
            if self.bias is not None:
                new.up.bias.copy_(self.bias)
        return new

    def to_dense(self) -> nn.Linear:
        return dense_linear(self.weight_matrix(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} → {self.active_rank()}/{self.rank} → {self.out_features}, "
            f"bias={self.bias is not None}"
        )


class SVDConv2d(SVDLayer):
    """A Conv2d trained in SVD form, channel-wise or spatial-wise (see the module docstring)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        scheme: Scheme = "channel",
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        rank: int | None = None,
        *,
        init: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """``init=True`` draws a Kaiming-normal kernel and stores its SVD (see ``from_shape``);
        ``init=False`` leaves zeros for a state dict to fill."""
        super().__init__()
        kh, kw = pair(kernel_size)
        stride_hw, dilation_hw = pair(stride), pair(dilation)
        pad: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        if pad == "same" and stride_hw != (1, 1):
            raise TensorslimError("padding='same' needs stride 1 (PyTorch's rule); pad explicitly")
        if scheme == "channel":
            m, n = out_channels, in_channels * kh * kw
        elif scheme == "spatial":
            m, n = out_channels * kw, in_channels * kh
        else:
            raise TensorslimError(f"unknown SVD scheme '{scheme}': use 'channel' or 'spatial'")
        rank = _resolve_rank(
            rank, min(m, n), f"a {scheme}-wise {out_channels}×{in_channels}×{kh}×{kw} conv"
        )
        self.in_channels, self.out_channels, self.scheme = in_channels, out_channels, scheme
        self.kernel_size, self.stride, self.dilation = (kh, kw), stride_hw, dilation_hw
        self.padding = pad
        self._init_factors(m, n, rank, device, dtype)
        self.bias = (
            nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        )
        if init:
            self.reset_parameters()

    # geometry of the two convolutions (identical to LowRankConv2d)
    def _down_geometry(self) -> tuple[tuple[int, int], tuple[int, int] | str, tuple[int, int]]:
        if self.scheme == "channel":
            return self.stride, self.padding, self.dilation
        pad = self.padding if isinstance(self.padding, str) else (self.padding[0], 0)
        return (self.stride[0], 1), pad, (self.dilation[0], 1)

    def _up_geometry(self) -> tuple[tuple[int, int], tuple[int, int] | str, tuple[int, int]]:
        if self.scheme == "channel":
            return (1, 1), (0, 0), (1, 1)
        pad = self.padding if isinstance(self.padding, str) else (0, self.padding[1])
        return (1, self.stride[1]), pad, (1, self.dilation[1])

    def _kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-in, ReLU gain) kernel → SVD of its scheme matrix.

        Bias U(±1/√fan_in), as ``nn.Conv2d`` does.
        """
        kernel = torch.empty(self._kernel_shape(), device=self.U.device)
        nn.init.kaiming_normal_(kernel, mode="fan_in", nonlinearity="relu")
        self._fill_from_matrix(conv_weight_to_matrix(kernel, self.scheme).to(self.U.dtype))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        scheme: Scheme = "channel",
        rank: int | None = None,
        driver: SvdDriver = "auto",
    ) -> SVDConv2d:
        """SVD of ``conv``'s kernel viewed the ``scheme`` way (exact at full rank)."""
        if not isinstance(conv, nn.Conv2d):
            raise TensorslimError(f"SVDConv2d.from_dense needs an nn.Conv2d, got {type(conv)}")
        reason = unsupported_conv_reason(conv)
        if reason is not None:
            raise TensorslimError(f"cannot train this Conv2d in SVD form: {reason}")
        w = conv.weight.detach()
        new = cls(scheme=scheme, rank=rank, init=False, **geometry_of(conv))
        new._fill_from_matrix(conv_weight_to_matrix(w, scheme), driver)
        if conv.bias is not None:
            with torch.no_grad():
                new.bias.copy_(conv.bias)
        return new

    def conv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernels of the two convolutions at the active rank k: (down, up)."""
        a, b = self.balanced_factors()
        k = a.shape[1]
        n, c, (kh, kw) = self.out_channels, self.in_channels, self.kernel_size
        if self.scheme == "channel":
            return b.T.reshape(k, c, kh, kw), a.reshape(n, k, 1, 1)
        # rows of A are (n, w), rows of B are (c, h)
        down = b.T.reshape(k, c, kh, 1)
        up = a.reshape(n, kw, k).permute(0, 2, 1).reshape(n, k, 1, kw)
        return down, up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.conv_weights()
        stride, pad, dilation = self._down_geometry()
        hidden = F.conv2d(x, down, None, stride, pad, dilation)
        stride, pad, dilation = self._up_geometry()
        return F.conv2d(hidden, up, self.bias, stride, pad, dilation)

    def flops_at_rank(self, input_shape: tuple[int, ...], rank: int) -> int:
        batch = math.prod(input_shape[:-3])
        h, w = input_shape[-2:]
        kh, kw = self.kernel_size
        ho, wo = conv_output_hw((h, w), self.kernel_size, self.stride, self.padding, self.dilation)
        n, c = self.out_channels, self.in_channels
        if self.scheme == "channel":
            return 2 * batch * ho * wo * rank * (c * kh * kw + n)
        stride, pad, dilation = self._down_geometry()
        mid_w = conv_output_hw((h, w), (kh, 1), stride, pad, dilation)[1]
        return 2 * batch * ho * (mid_w * rank * c * kh + wo * rank * n * kw)

    def dense_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-3])
        ho, wo = conv_output_hw(
            tuple(input_shape[-2:]), self.kernel_size, self.stride, self.padding, self.dilation
        )
        kh, kw = self.kernel_size
        return 2 * batch * ho * wo * self.out_channels * self.in_channels * kh * kw

    def to_lowrank(self) -> LowRankConv2d:
        """The truncated ``LowRankConv2d`` at the active rank (same scheme and geometry)."""
        down, up = (t.detach() for t in self.conv_weights())
        new = LowRankConv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            down.shape[0],
            self.scheme,
            self.stride,
            self.padding,
            self.dilation,
            self.bias is not None,
            device=down.device,
            dtype=down.dtype,
        )
        with torch.no_grad():
            new.down.weight.copy_(down)
            new.up.weight.copy_(up)
            if self.bias is not None:
                new.up.bias.copy_(self.bias)
        return new

    def dense_weight(self) -> torch.Tensor:
        """The kernel (n, c, kh, kw) the factors multiply out to."""
        return matrix_to_conv_weight(self.weight_matrix(), self._kernel_shape(), self.scheme)

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.scheme}-wise, {self.in_channels} → {self.active_rank()}/{self.rank} → "
            f"{self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}"
        )


SVD_LAYER_TYPES: tuple[type[SVDLayer], ...] = (SVDLinear, SVDConv2d)


def svd_layers(model: nn.Module) -> list[tuple[str, SVDLayer]]:
    """(fqn, layer) of every SVD-form layer in ``model`` (shared layers listed once)."""
    seen: set[int] = set()
    found = []
    for fqn, module in model.named_modules():
        if isinstance(module, SVDLayer) and id(module) not in seen:
            seen.add(id(module))
            found.append((fqn, module))
    return found
