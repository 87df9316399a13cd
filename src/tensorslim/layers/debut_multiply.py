"""The DeBut chain multiply: factors applied to feature-major activations, without masks.

A factor (p, q, r, s, t) with nonzeros w (B, r, s, t) maps X (features × columns) viewed as
(B, s, t, M) to Y[b, i, d, m] = Σ_j w[b, i, j, d] · X[b, j, d, m] (Y viewed (B, r, t, M) =
p × M); exact neighbours merge into one factor with a larger grid (``merge_weights``). The
kernels (``bmm``, ``ew``, ``pbmm``) and the layers built on them are described in
:mod:`tensorslim.layers.debut`; this module is the math the layers and the fits
(:mod:`tensorslim.decompose.debut_als`) share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tensorslim.errors import TensorslimError
from tensorslim.layers.debut_chain import DeButChain, DeButFactor, Segment, merge_specs

# --------------------------------------------------------------------------------------------
# merged weights of exact neighbours


def merge_pair(
    first: DeButFactor, w_first: torch.Tensor, second: DeButFactor, w_second: torch.Tensor
) -> torch.Tensor:
    """Nonzeros of F₂F₁ as one factor (p₂, q₁, r₂r₁, s₂s₁, t₁); needs t₂ = r₁t₁.

    With b₁ = b₂·s₂ + j₂ and d₂ = i₁·t₁ + d₁ every merged nonzero is a single product:
    M[b₂, (i₂,i₁), (j₂,j₁), d₁] = w₂[b₂, i₂, j₂, (i₁,d₁)] · w₁[(b₂,j₂), i₁, j₁, d₁].
    """
    merged = merge_specs((first, second))
    b2, r2, s2 = second.blocks, second.r, second.s
    r1, s1, t1 = first.r, first.s, first.t
    second_v = w_second.reshape(b2, r2, s2, r1, 1, t1)  # (b, i2, j2, i1, ·, d1)
    first_v = w_first.reshape(b2, 1, s2, r1, s1, t1)  # (b, ·, j2, i1, j1, d1)
    product = second_v * first_v  # (b, i2, j2, i1, j1, d1)
    return product.permute(0, 1, 3, 2, 4, 5).reshape(merged.weight_shape)


def merge_weights(specs: Sequence[DeButFactor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Nonzeros of the product of a run of exact neighbours (input side first)."""
    spec, w = specs[0], weights[0]
    for nxt, w_nxt in zip(specs[1:], weights[1:], strict=True):
        w = merge_pair(spec, w, nxt, w_nxt)
        spec = merge_specs((spec, nxt))
    return w


# --------------------------------------------------------------------------------------------
# kernels on feature-major activations X (q × M) → (p × M)


def _ew_forward(w: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
    """Y[b,i,d,m] = Σ_j w[b,i,j,d] X[b,j,d,m] as s broadcast multiply-adds (w: (B, r, s, t))."""
    blocks, r, s, _ = w.shape
    xv = x.reshape(blocks, s, t, -1)
    y = torch.mul(w[:, :, 0, :, None], xv[:, None, 0])
    for j in range(1, s):
        y.addcmul_(w[:, :, j, :, None], xv[:, None, j])
    return y.reshape(blocks * r * t, -1)


def _channel_gram(gy: torch.Tensor, x: torch.Tensor, r: int, s: int, t: int) -> torch.Tensor:
    """G[b,i,j,d] = Σ_m gY[b,i,d,m] X[b,j,d,m] (the gradient of w), shape (B, r, s, t)."""
    cols = gy.shape[-1]
    blocks = gy.shape[0] // (r * t)
    gv = gy.reshape(blocks, r, t, cols)
    xv = x.reshape(blocks, s, t, cols)
    if r * s <= 16:
        # a few fused products + row sums beat regrouping copies for small grids
        out = gy.new_empty(blocks, r, s, t)
        for i in range(r):
            for j in range(s):
                out[:, i, j] = torch.linalg.vecdot(gv[:, i], xv[:, j])
        return out
    g = gv.transpose(1, 2).reshape(blocks * t, r, cols)
    xx = xv.transpose(1, 2).reshape(blocks * t, s, cols)
    return torch.bmm(g, xx.transpose(1, 2)).reshape(blocks, t, r, s).permute(0, 2, 3, 1)


class _EwMultiply(torch.autograd.Function):
    """The ``ew`` kernel with a hand-written backward (autograd of broadcasts would materialise
    r·s full-size temporaries): ∂X = the transposed factor applied to ∂Y, ∂w = channel grams."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        ctx.save_for_backward(w, x)
        ctx.t = t
        return _ew_forward(w, x, t)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w, x = ctx.saved_tensors
        t = ctx.t
        _, r, s, _ = w.shape
        gy = gy.contiguous()
        gx = _ew_forward(w.transpose(1, 2), gy, t) if ctx.needs_input_grad[1] else None
        gw = _channel_gram(gy, x, r, s, t) if ctx.needs_input_grad[0] else None
        return gw, gx, None


def apply_factor(
    spec: DeButFactor, w: torch.Tensor, x: torch.Tensor, kernel: str | None = None
) -> torch.Tensor:
    """F·X for one (possibly merged) factor; X is (q × M) feature-major, result (p × M)."""
    blocks, r, s, t = spec.weight_shape
    if kernel is None:
        kernel = "bmm" if t == 1 else ("ew" if r * s <= 64 else "pbmm")
    if t == 1:
        # X (q × M) viewed (B, s, M) is a strided batch of s×M matrices even when X is the
        # transpose of a row-major input, which BLAS reads without a copy
        return torch.bmm(w.reshape(blocks, r, s), x.reshape(blocks, s, -1)).reshape(spec.p, -1)
    x = x.contiguous()
    if kernel == "ew":
        if torch.is_grad_enabled() and (w.requires_grad or x.requires_grad):
            return _EwMultiply.apply(w, x, t)
        return _ew_forward(w, x, t)
    if kernel != "pbmm":
        raise TensorslimError(f"unknown DeBut kernel '{kernel}': use bmm, ew or pbmm")
    cols = x.shape[-1]
    xb = x.reshape(blocks, s, t, cols).transpose(1, 2).reshape(blocks * t, s, cols)
    wb = w.permute(0, 3, 1, 2).reshape(blocks * t, r, s)
    y = torch.bmm(wb, xb).reshape(blocks, t, r, cols).transpose(1, 2)
    return y.reshape(spec.p, cols)


def chain_multiply(
    factors: Sequence[DeButFactor],
    weights: Sequence[torch.Tensor],
    x: torch.Tensor,
    segments: Sequence[Segment] | None = None,
    merged: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """F_K ⋯ F_1 · X for feature-major X (in × M); ``segments`` merge exact neighbours.

    Without ``segments`` every factor runs on its own (the reference path). ``merged`` may give
    precomputed merged weights, one per segment.
    """
    if segments is None:
        for spec, w in zip(factors, weights, strict=True):
            x = apply_factor(spec, w, x)
        return x
    for n, seg in enumerate(segments):
        if merged is not None:
            w = merged[n]
        elif seg.stop - seg.start == 1:
            w = weights[seg.start]
        else:
            w = merge_weights(factors[seg.start : seg.stop], weights[seg.start : seg.stop])
        x = apply_factor(seg.spec, w, x, seg.kernel)
    return x


def transpose_chain(
    factors: Sequence[DeButFactor], weights: Sequence[torch.Tensor]
) -> tuple[list[DeButFactor], list[torch.Tensor]]:
    """(F_K ⋯ F_1)ᵀ = F_1ᵀ ⋯ F_Kᵀ as a chain, input side first: [F_Kᵀ, …, F_1ᵀ]."""
    return (
        [f.transpose() for f in reversed(factors)],
        [w.transpose(1, 2) for w in reversed(weights)],
    )


def chain_dense(factors: Sequence[DeButFactor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense product F_K ⋯ F_1 (out × in), by the fast multiply applied to the identity."""
    eye = torch.eye(factors[0].q, dtype=weights[0].dtype, device=weights[0].device)
    return chain_multiply(factors, weights, eye)


def chain_dense_reference(
    factors: Sequence[DeButFactor], weights: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The same product from explicit dense factors (slow; for tests and masked-dense timing)."""
    out = factors[0].dense(weights[0])
    for spec, w in zip(factors[1:], weights[1:], strict=True):
        out = spec.dense(w) @ out
    return out


def random_factor_weights(
    chain: DeButChain,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    std: float | None = None,
) -> list[torch.Tensor]:
    """Variance-preserving random nonzeros: w ~ N(0, 1/s_k) in every factor.

    Each output of a factor sums s_k inputs, so each factor keeps the activation variance and a
    single-path chain's product has entries of variance Π 1/s_k = 1/in (LeCun scaling).
    ``std`` instead draws every nonzero from N(0, std²) (the official layers use 1/√2).
    """
    out = []
    for spec in chain:
        w = torch.randn(spec.weight_shape, generator=generator, dtype=dtype, device="cpu")
        scale = std if std is not None else 1.0 / math.sqrt(spec.s)
        out.append((w * scale).to(device=device))
    return out


# --------------------------------------------------------------------------------------------
# the multiply as a module part: plan per column count, merged weights cached at inference
