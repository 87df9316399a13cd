"""DeBut layers: ``DeButLinear`` and ``DeButConv2d``, and the fast chain multiply behind them.

A dense weight W (out × in) is replaced by a DeBut chain F_K ⋯ F_1 (see
``tensorslim.layers.debut_chain`` for factors, chains and their text form). A conv kernel is the
matrix C_out × (kh·kw·C_in), by default position-major as in the official ``DeBut_2dConv``
(``tensorslim.layers.debut_layout``: the orders, and zero-padding of sizes that do not factor),
applied to the unfolded input.

**Fast multiply.** Activations are kept *feature-major*: X is (features × columns), columns being
the rows of a Linear input or the (image, position) pairs of a conv. A factor (p, q, r, s, t)
with nonzeros w (B, r, s, t) maps X viewed as (B, s, t, M) to

    Y[b, i, d, m] = Σ_j w[b, i, j, d] · X[b, j, d, m]            (Y viewed (B, r, t, M) = p × M)

without ever forming a masked p×q matrix. Exact neighbours (t_(k+1) = r_k t_k) are merged into
one factor with a larger grid when that saves passes over memory (``plan_segments`` decides by a
cost model). A merged factor runs with one of three kernels:

- ``bmm`` (t = 1): one ``torch.bmm`` of B blocks (r×s)·(s×M), no copies — in this layout every
  t = 1 factor is a plain batched matmul, and the first one reads a Linear input (N × in)
  through a transposed view for free;
- ``ew`` (small grids, t > 1): s fused multiply-adds over the whole activation (a custom
  autograd function computes ∂X with the transposed factor and ∂w as per-(b, d) dot products);
- ``pbmm`` (large grids, t > 1): regroup to (B·t) batches, batched matmul, regroup back.

FLOPs: 2 per multiply-add, 2·columns·Σ_k p_k s_k for the chain as given (merging is an execution
detail; the analytic count is the chain's). Parameters: Σ_k p_k s_k (+ bias).
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tensorslim.decompose.debut_als import als_fit, bp_fit, grad_fit
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.conv_geometry import (
    conv_output_hw,
    geometry_of,
    pair,
    unsupported_conv_reason,
)
from tensorslim.layers.debut_chain import (
    DeButChain,
    Segment,
    plan_segments,
)
from tensorslim.layers.debut_layout import (
    check_order,
    check_padded,
    kernel_to_matrix,
    matrix_to_kernel,
    pad_rows,
    padded_target,
    unfolded_features,
)
from tensorslim.layers.debut_multiply import (  # noqa: F401  (re-exported)
    apply_factor,
    chain_dense,
    chain_dense_reference,
    chain_multiply,
    merge_pair,
    merge_weights,
    random_factor_weights,
    transpose_chain,
)


def _cols_bucket(cols: int | torch.Tensor) -> int:
    """The power of two ≥ ``cols`` that plans are made for.

    Under ``torch.jit.trace`` (ONNX export) a shape entry is a 0-d tensor: ``int`` reads its
    value; the plan only picks kernels, the result is the same for every column count.
    """
    return 1 << max(0, (max(1, int(cols)) - 1).bit_length())


class _DeButCore(nn.Module):
    """The chain's nonzeros as parameters ``factors.k`` (shape (B, r, s, t)) and its multiply."""

    def __init__(
        self,
        chain: DeButChain,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.chain = chain
        self.factors = nn.ParameterList(
            [
                nn.Parameter(torch.empty(spec.weight_shape, device=device, dtype=dtype))
                for spec in chain
            ]
        )
        self.fuse = True  # merge exact neighbours when the cost model says it pays
        self._merged_cache: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        self._compiled: dict[Any, Callable[..., torch.Tensor]] = {}
        self._compile_failed = False
        self.use_compile = False

    def segments(self, cols: int) -> tuple[Segment, ...] | None:
        if not self.fuse:
            return None
        return plan_segments(self.chain, _cols_bucket(cols))

    def _merged(self, segments: tuple[Segment, ...]) -> list[torch.Tensor] | None:
        # merged weights only change when a parameter does: cache them for inference, recompute
        # under autograd so gradients reach the factors
        params = list(self.factors)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return None
        key = (
            segments,
            tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params),
        )
        hit = self._merged_cache.get(key)
        if hit is None:
            with torch.no_grad():
                hit = [
                    params[s.start]
                    if s.stop - s.start == 1
                    else merge_weights(
                        self.chain.factors[s.start : s.stop], params[s.start : s.stop]
                    )
                    for s in segments
                ]
            self._merged_cache.clear()
            self._merged_cache[key] = hit
        return hit

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """F_K ⋯ F_1 · X for feature-major X (in × M) → (out × M)."""
        segments = self.segments(x.shape[-1])
        merged = self._merged(segments) if segments is not None else None
        weights = merged if merged is not None else list(self.factors)
        if self.use_compile and not self._compile_failed:
            try:
                return self._runner(segments, merged is not None)(x, *weights)
            except Exception as exc:  # any compiler failure falls back to eager
                self._compile_failed = True
                warnings.warn(
                    f"torch.compile of the DeBut multiply failed ({type(exc).__name__}: {exc}); "
                    "running eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return chain_multiply(self.chain.factors, list(self.factors), x, segments, merged)

    def _runner(
        self, segments: tuple[Segment, ...] | None, premerged: bool
    ) -> Callable[..., torch.Tensor]:
        """A compiled function of (X, *weights) for one static plan; planning and caching stay
        outside the compiled region so the graph holds only tensor work."""
        key = (segments, premerged)
        compiled = self._compiled.get(key)
        if compiled is None:
            factors = self.chain.factors

            def run(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
                if premerged:
                    return chain_multiply(factors, [], x, segments, list(weights))
                return chain_multiply(factors, list(weights), x, segments)

            # a code object of its own per layer and plan: dynamo keeps compiled graphs per code
            # object, so layers sharing one would evict each other past its recompile limit
            code = run.__code__.replace(
                co_name=f"debut_multiply_{id(self):x}_{len(self._compiled)}"
            )
            own = types.FunctionType(code, run.__globals__, code.co_name, None, run.__closure__)
            compiled = self._compiled[key] = torch.compile(own, dynamic=False)
        return compiled

    def dense_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return chain_dense(self.chain.factors, [p.detach() for p in self.factors])

    def _apply(self, fn: Any, recurse: bool = True) -> nn.Module:  # type: ignore[override]
        self._merged_cache.clear()
        self._compiled.clear()
        return super()._apply(fn, recurse)


def _check_chain(
    chain: DeButChain | str, out_features: int, in_features: int, what: str, pad: bool
) -> DeButChain:
    chain = DeButChain.parse(chain)
    check_padded(chain.out_features, chain.in_features, out_features, in_features, pad, what)
    chain.check_qualified()
    return chain


def _structure_config(layer: DeButLinear | DeButConv2d) -> dict[str, Any]:
    """What rebuilds ``layer``: its chain, how it was initialised, and padding if any."""
    config: dict[str, Any] = {"chain": layer.chain.text, "init": dict(layer.init_info)}
    if layer.padded:
        config["pad"] = True
    return config


# --------------------------------------------------------------------------------------------
# layers


class DeButLinear(StructuredLayer):
    """x (…, in) → F_K ⋯ F_1 x + b for a qualified DeBut chain (in → out).

    ``pad=True`` accepts a larger chain in_pad → out_pad (the official zero-padding): x gets
    in_pad − in zeros appended and the first ``out`` outputs are kept.
    FLOPs 2·rows·Σ_k p_k s_k; parameters Σ_k p_k s_k (+ out for the bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        chain: DeButChain | str,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        pad: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.chain = _check_chain(
            chain, out_features, in_features, f"Linear({in_features}, {out_features})", pad
        )
        self.core = _DeButCore(self.chain, device=device, dtype=dtype)
        self.bias = (
            nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        )
        self.init_info: dict[str, Any] = {"method": "random"}
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Variance-preserving random factors (see ``random_factor_weights``), bias like Linear."""
        if self.core.factors[0].device.type == "meta":
            return
        weights = random_factor_weights(
            self.chain, generator=generator, dtype=self.core.factors[0].dtype
        )
        with torch.no_grad():
            for p, w in zip(self.core.factors, weights, strict=True):
                p.copy_(w)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound, generator=generator)
        self.init_info = {"method": "random"}

    @property
    def factors(self) -> nn.ParameterList:
        return self.core.factors

    @property
    def padded(self) -> bool:
        """True when the chain is larger than the layer (zero-padded input, cropped output)."""
        return (self.chain.out_features, self.chain.in_features) != (
            self.out_features,
            self._matrix_columns(),
        )

    def _matrix_columns(self) -> int:
        return self.in_features

    def weight_matrix(self) -> torch.Tensor:
        """The dense weight the layer computes, (out × in): the chain's product, cropped."""
        return self.core.dense_weight()[: self.out_features, : self._matrix_columns()]

    @classmethod
    def from_dense(
        cls,
        layer: nn.Linear,
        chain: DeButChain | str,
        init: str = "als",
        *,
        sweeps: int = 6,
        steps: int = 300,
        seed: int = 0,
        pad: bool = False,
        **fit: Any,
    ) -> DeButLinear:
        """A DeBut layer fitted to ``layer.weight`` (``init``: one of ``INITS``;
        ``fit``: the options of ``init_from_weight``)."""
        w = layer.weight.detach()
        new = cls(
            layer.in_features,
            layer.out_features,
            chain,
            layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
            pad=pad,
        )
        new.init_from_weight(w, init, sweeps=sweeps, steps=steps, seed=seed, **fit)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)  # type: ignore[union-attr]
        return new

    def init_from_weight(
        self,
        weight: torch.Tensor,
        init: str = "als",
        *,
        sweeps: int = 6,
        steps: int = 300,
        seed: int = 0,
        **fit: Any,
    ) -> list[float]:
        """Fit the factors to a dense (out × in) weight; returns the errors it reports.

        ``fit``: ``als_start`` ("normal" / "uniform"), ``als_first`` ("input" / "output"),
        ``balance`` (see ``als_fit``) and ``random_std`` (see ``random_factor_weights``).
        A padded chain is fitted to the weight at the top left of zeros (the official
        ``PaddingMatrix``), so the reported error is that of the padded matrix.
        """
        target = padded_target(weight, self.chain.out_features, self.chain.in_features)
        errors = _fit_core(self.core, target, init, sweeps=sweeps, steps=steps, seed=seed, **fit)
        self.init_info = _init_info(init, errors, sweeps, steps, fit)
        return errors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise TensorslimError(
                f"DeButLinear expects inputs with {self.in_features} features, got {tuple(x.shape)}"
            )
        lead = x.shape[:-1]
        cols = x.reshape(-1, self.in_features).t()  # feature-major view, no copy
        y = self.core.multiply(pad_rows(cols, self.chain.in_features))
        y = y[: self.out_features].t().reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def to_dense(self) -> nn.Linear:
        w = self.core.factors[0]
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight_matrix())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        return self.chain.flops(math.prod(input_shape[:-1]))

    def analytic_params(self) -> int:
        return self.chain.nnz + (self.out_features if self.bias is not None else 0)

    def config(self) -> dict[str, Any]:
        return _structure_config(self)

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} → {self.out_features}, {len(self.chain)} factors, "
            f"{self.chain.nnz} nonzeros ({self.chain.compression:.1f}× fewer), "
            f"chain '{self.chain.text}'"
        )


class DeButConv2d(StructuredLayer):
    """A Conv2d whose kernel, viewed C_out × (kh·kw·C_in), is a DeBut chain.

    ``order="position"`` (default, the official ``DeBut_2dConv``): the kernel is
    ``W.view(C_out, kh, kw, C_in).permute(0, 3, 1, 2)`` for the chain's product W;
    ``order="channel"``: ``W.view(C_out, C_in, kh, kw)`` (``F.unfold``'s order; see
    ``debut_layout``). ``pad=True`` accepts a larger chain (the official zero-padding).
    unfold x → (N, C_in·kh·kw, L) → columns in ``order``, feature-major → the chain on every
    column → (N, C_out, Ho, Wo) + b; stride, padding (ints, pairs, "same", "valid") and
    dilation as in nn.Conv2d.
    FLOPs 2·N·Ho·Wo·Σ_k p_k s_k; parameters Σ_k p_k s_k (+ C_out).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        chain: DeButChain | str,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        order: str = "position",
        pad: bool = False,
    ) -> None:
        super().__init__()
        self.order = check_order(order)
        kh, kw = pair(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise TensorslimError(
                    f"padding '{padding}' is unknown: use an int, a pair, 'same' or 'valid'"
                )
            if padding == "same" and self.stride != (1, 1):
                raise TensorslimError("padding='same' needs stride 1 (as in nn.Conv2d)")
        self.padding: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        self.fan_in = in_channels * kh * kw
        self.chain = _check_chain(
            chain,
            out_channels,
            self.fan_in,
            f"Conv2d({in_channels}→{out_channels}, {kh}×{kw}) as a matrix",
            pad,
        )
        self.core = _DeButCore(self.chain, device=device, dtype=dtype)
        self.bias = (
            nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        )
        self.init_info: dict[str, Any] = {"method": "random"}
        self.reset_parameters()

    reset_parameters = DeButLinear.reset_parameters

    @property
    def in_features(self) -> int:
        """Inputs of one kernel application, kh·kw·C_in (fan-in; the bias bound uses it)."""
        return self.fan_in

    @property
    def out_features(self) -> int:
        return self.out_channels

    def _matrix_columns(self) -> int:
        return self.fan_in

    @property
    def factors(self) -> nn.ParameterList:
        return self.core.factors

    padded = DeButLinear.padded
    weight_matrix = DeButLinear.weight_matrix

    @classmethod
    def from_dense(
        cls,
        layer: nn.Conv2d,
        chain: DeButChain | str,
        init: str = "als",
        *,
        sweeps: int = 6,
        steps: int = 300,
        seed: int = 0,
        order: str = "position",
        pad: bool = False,
        **fit: Any,
    ) -> DeButConv2d:
        """A DeBut conv fitted to ``layer``'s kernel (``init``: one of ``INITS``),
        viewed as a matrix in ``order``."""
        reason = unsupported_conv_reason(layer)
        if reason is not None:
            raise TensorslimError(f"cannot make a DeBut conv from this Conv2d: {reason}")
        w = layer.weight.detach()
        new = cls(chain=chain, order=order, pad=pad, **geometry_of(layer))
        matrix = kernel_to_matrix(w, order)
        new.init_from_weight(matrix, init, sweeps=sweeps, steps=steps, seed=seed, **fit)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)  # type: ignore[union-attr]
        return new

    init_from_weight = DeButLinear.init_from_weight

    def _unfold(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if padding == "same":
            # PyTorch pads 'same' with the extra row/column (even kernels) at the end
            pads = []
            for k, d in zip(reversed(self.kernel_size), reversed(self.dilation), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
            padding = (0, 0)
        elif padding == "valid":
            padding = (0, 0)
        return F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise TensorslimError(
                f"DeButConv2d expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}"
            )
        n = x.shape[0]
        ho, wo = conv_output_hw(
            (x.shape[2], x.shape[3]), self.kernel_size, self.stride, self.padding, self.dilation
        )
        cols = self._unfold(x)  # (N, C·kh·kw, L), L = Ho·Wo
        kh, kw = self.kernel_size
        feature_major = unfolded_features(cols, self.in_channels, kh * kw, self.order)
        y = self.core.multiply(pad_rows(feature_major, self.chain.in_features))  # (C_out, N·L)
        y = y[: self.out_channels].reshape(self.out_channels, n, ho, wo).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y.contiguous()

    def to_dense(self) -> nn.Conv2d:
        w = self.core.factors[0]
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            kernel = matrix_to_kernel(
                self.weight_matrix(), self.in_channels, self.kernel_size, self.order
            )
            dense.weight.copy_(kernel)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        batch = math.prod(input_shape[:-3])
        ho, wo = conv_output_hw(
            tuple(input_shape[-2:]), self.kernel_size, self.stride, self.padding, self.dilation
        )
        return self.chain.flops(batch * ho * wo)

    def analytic_params(self) -> int:
        return self.chain.nnz + (self.out_channels if self.bias is not None else 0)

    def config(self) -> dict[str, Any]:
        return {**_structure_config(self), "order": self.order}

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (
            f"{self.in_channels} → {self.out_channels}, {kh}×{kw}, stride {self.stride}, "
            f"padding {self.padding}, {self.order}-major, {len(self.chain)} factors, "
            f"{self.chain.nnz} nonzeros, "
            f"chain '{self.chain.text}'"
        )


# --------------------------------------------------------------------------------------------
# initialisation from a dense weight

# "bp": the official gradient initialisation (one random probe per plain gradient step)
INITS = ("als", "grad", "bp", "random")


def _fit_core(
    core: _DeButCore,
    weight: torch.Tensor,
    init: str,
    *,
    sweeps: int,
    steps: int,
    seed: int,
    als_start: str = "normal",
    als_first: str = "input",
    balance: bool = True,
    random_std: float | None = None,
) -> list[float]:
    """Fill ``core``'s factors from ``weight`` (out × in) by ``init``; the fit's error list."""
    if init not in INITS:
        raise TensorslimError(f"unknown DeBut init '{init}': use {', '.join(INITS)}")
    generator = torch.Generator().manual_seed(seed)
    target = weight.detach()
    if init == "random":
        weights = random_factor_weights(
            core.chain, generator=generator, dtype=torch.float64, std=random_std
        )
        errors: list[float] = []
    elif init == "als":
        weights, errors = als_fit(
            target,
            core.chain,
            sweeps=sweeps,
            generator=generator,
            start=als_start,
            first=als_first,
            balance=balance,
        )
    elif init == "bp":
        weights, errors = bp_fit(target, core.chain, steps=steps, generator=generator)
    else:
        weights, errors = grad_fit(target, core.chain, steps=steps, generator=generator)
    with torch.no_grad():
        for p, w in zip(core.factors, weights, strict=True):
            p.copy_(w.to(dtype=p.dtype, device=p.device))
    return errors


def _init_info(
    init: str, errors: list[float], sweeps: int, steps: int, fit: dict[str, Any]
) -> dict[str, Any]:
    info: dict[str, Any] = {"method": init}
    if init == "als":
        info["sweeps"] = sweeps
        # options that differ from the defaults are part of the record
        for key, default in (("als_start", "normal"), ("als_first", "input"), ("balance", True)):
            if fit.get(key, default) != default:
                info[key] = fit[key]
    elif init == "random" and fit.get("random_std") is not None:
        info["random_std"] = fit["random_std"]
    if init in ("grad", "bp"):
        info["steps"] = steps
    if errors:
        info["error"] = round(float(errors[-1]), 6)
    return info
