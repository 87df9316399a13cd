"""Tensor-train Linear layer (Novikov et al., NeurIPS 2015, "Tensorizing Neural Networks").

The weight W (out × in) is a TT-matrix with out = Π m_k, in = Π n_k (k = 1 … d):

    W[(i₁…i_d), (j₁…j_d)] = G₁[:, i₁, j₁, :] G₂[:, i₂, j₂, :] ⋯ G_d[:, i_d, j_d, :],

cores G_k of shape (r_{k−1}, m_k, n_k, r_k), r₀ = r_d = 1 (see :mod:`tensorslim.decompose.tt`).
When a feature count factorises badly (a large prime), the layer works on a zero-padded size:
inputs are padded with zeros to Π n_k and outputs are cut back to ``out_features``.

Forward without forming W: the input x (B, Π n_k) is reshaped to (B, n₁, …, n_d) and the cores
are contracted one mode at a time. Before step k the working tensor is
T_k[b, j_k, (j_{k+1}…j_d), (i₁…i_{k−1}), r_{k−1}]; step k is one matmul

    T_{k+1}[b, (j_{k+1}…), (i₁…i_k), r_k] = Σ_{r_{k−1}, j_k} T_k[…] · G_k[r_{k−1}, i_k, j_k, r_k],

a (B·N_{>k}·M_{<k}) × (r_{k−1} n_k) by (r_{k−1} n_k) × (m_k r_k) product. FLOPs (2 per
multiply-add) for B input rows:

    Σ_k 2·B·N_{>k}·M_{<k}·r_{k−1}·n_k·m_k·r_k,    N_{>k} = Π_{j>k} n_j,  M_{<k} = Π_{j<k} m_j.

The cores can as well be contracted last to first (Σ_k 2·B·N_{<k}·M_{>k}·r_{k−1}·n_k·m_k·r_k);
the layer uses whichever order is cheaper for its modes and ranks. Note that a TT layer saves
parameters far more than FLOPs: the intermediate tensors can be larger than the input row, so at
moderate ranks it may cost as many FLOPs as the dense layer. The cost is compared with
2·B·in·out dense (bias additions are not counted, as for the dense layer). Parameters
Σ_k r_{k−1} m_k n_k r_k (+ out bias).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from tensorslim.decompose.tt import TTResult, choose_modes, full_tt_ranks, tt_svd, tt_to_matrix
from tensorslim.errors import TensorslimError
from tensorslim.layers.base import StructuredLayer, dense_linear


def tt_modes_for(
    in_features: int, out_features: int, d: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(out_modes, in_modes) for a Linear(in, out) split into ``d`` modes each (padding only
    badly factorising sizes, see :func:`tensorslim.decompose.tt.choose_modes`)."""
    if d < 1:
        raise TensorslimError(f"TT needs d ≥ 1 modes, got {d}")
    return choose_modes(out_features, d)[0], choose_modes(in_features, d)[0]


class TTLinear(StructuredLayer):
    """Linear layer whose weight is a TT-matrix (see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        out_modes: Sequence[int],
        in_modes: Sequence[int],
        ranks: Sequence[int],
        bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        out_modes, in_modes, ranks = tuple(out_modes), tuple(in_modes), tuple(ranks)
        d = len(out_modes)
        if d < 1 or len(in_modes) != d:
            raise TensorslimError(f"TT modes must have equal length ≥ 1: {out_modes}, {in_modes}")
        if len(ranks) != d + 1 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise TensorslimError(
                f"TT ranks must be (1, r₁, …, r_{{d−1}}, 1) with r ≥ 1 for d={d}, got {ranks}"
            )
        if math.prod(out_modes) < out_features or math.prod(in_modes) < in_features:
            raise TensorslimError(
                f"TT modes {out_modes}×{in_modes} cannot hold a Linear({in_features}, "
                f"{out_features}): their products must be ≥ the feature counts"
            )
        self.in_features, self.out_features = in_features, out_features
        self.out_modes, self.in_modes, self.ranks = out_modes, in_modes, ranks
        self.padded_in, self.padded_out = math.prod(in_modes), math.prod(out_modes)
        # Contract the cores in the cheaper order (it depends only on modes and ranks).
        self.direction = cheaper_direction(out_modes, in_modes, ranks)
        # Random init with Var(W_ij) ≈ 1/(3·in) like nn.Linear's default: each entry of W is a
        # sum of Π r_k products of d core entries.
        std = (1.0 / (3.0 * in_features * math.prod(ranks))) ** (1.0 / (2 * d))
        self.cores = nn.ParameterList(
            nn.Parameter(
                torch.randn(
                    ranks[k], out_modes[k], in_modes[k], ranks[k + 1], device=device, dtype=dtype
                )
                * std
            )
            for k in range(d)
        )
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_dense(
        cls,
        layer: nn.Linear,
        d: int = 3,
        max_rank: int | None = None,
        eps: float | None = None,
        out_modes: Sequence[int] | None = None,
        in_modes: Sequence[int] | None = None,
        result: TTResult | None = None,
    ) -> TTLinear:
        """TT-SVD of ``layer.weight`` (zero-padded if the modes need it).

        Modes default to :func:`tt_modes_for` with ``d`` modes; ``max_rank`` caps the TT ranks,
        ``eps`` sets the δ-truncation accuracy; neither gives the exact (full-rank) TT.
        """
        if not isinstance(layer, nn.Linear):
            raise TensorslimError(f"TT needs an nn.Linear, got {type(layer).__name__}")
        if result is None:
            if out_modes is None or in_modes is None:
                auto_out, auto_in = tt_modes_for(layer.in_features, layer.out_features, d)
                out_modes = tuple(out_modes or auto_out)
                in_modes = tuple(in_modes or auto_in)
            result = tt_svd(
                padded_weight(layer.weight.detach(), tuple(out_modes), tuple(in_modes)),
                tuple(out_modes),
                tuple(in_modes),
                max_rank=max_rank,
                eps=eps,
            )
        w = layer.weight
        new = cls(
            layer.in_features,
            layer.out_features,
            result.out_modes,
            result.in_modes,
            result.ranks,
            layer.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for core, value in zip(new.cores, result.cores, strict=True):
                core.copy_(value)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if x.shape[-1] != self.in_features:
            raise TensorslimError(
                f"TTLinear expects {self.in_features} input features, got {x.shape[-1]}"
            )
        t = x.reshape(-1, self.in_features)
        if self.padded_in != self.in_features:
            t = F.pad(t, (0, self.padded_in - self.in_features))
        batch = t.shape[0]
        if self.direction == "forward":
            out = self._forward_first_to_last(t, batch)
        else:
            out = self._forward_last_to_first(t, batch)
        if self.padded_out != self.out_features:
            out = out[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def _forward_first_to_last(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        done, rest, rank = 1, self.padded_in, 1  # M_{<k}, n_k·N_{>k}, r_{k−1}
        for k, core in enumerate(self.cores):
            n_k, m_k, r_next = self.in_modes[k], self.out_modes[k], self.ranks[k + 1]
            rest //= n_k
            # t: (B, n_k, N_{>k}, M_{<k}, r_{k−1}) → rows (B, N_{>k}, M_{<k}), cols (r_{k−1}, n_k)
            t = t.reshape(batch, n_k, rest, done, rank).permute(0, 2, 3, 4, 1)
            mat = core.permute(0, 2, 1, 3).reshape(rank * n_k, m_k * r_next)
            t = t.reshape(-1, rank * n_k) @ mat  # (B·N_{>k}·M_{<k}, m_k·r_k)
            # The rows are (B, n_{k+1}, N_{>k+1}, M_{<k}) and the columns (m_k, r_k): exactly
            # the layout the next step reshapes to.
            done *= m_k
            rank = r_next
        return t.reshape(batch, self.padded_out)

    def _forward_last_to_first(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        left, done, rank = self.padded_in, 1, 1  # N_{<k}·n_k, M_{>k}, r_k
        for k in reversed(range(len(self.cores))):
            core = self.cores[k]
            n_k, m_k, r_prev = self.in_modes[k], self.out_modes[k], self.ranks[k]
            left //= n_k
            # t: (B, N_{<k}, n_k, r_k, M_{>k}) → rows (B, N_{<k}, M_{>k}), cols (n_k, r_k)
            t = t.reshape(batch, left, n_k, rank, done).permute(0, 1, 4, 2, 3)
            mat = core.permute(2, 3, 0, 1).reshape(n_k * rank, r_prev * m_k)
            t = t.reshape(-1, n_k * rank) @ mat  # (B·N_{<k}·M_{>k}, r_{k−1}·m_k)
            # → (B, N_{<k}, r_{k−1}, m_k, M_{>k}) so that (m_k, M_{>k}) is the new M_{≥k}.
            t = t.reshape(batch, left, done, r_prev, m_k).permute(0, 1, 3, 4, 2)
            done *= m_k
            rank = r_prev
        return t.reshape(batch, self.padded_out)

    def weight_matrix(self) -> torch.Tensor:
        """The dense (out × in) weight, cropped from the padded TT-matrix."""
        full = tt_to_matrix(list(self.cores))
        return full[: self.out_features, : self.in_features]

    def to_dense(self) -> nn.Linear:
        return dense_linear(self.weight_matrix(), self.bias)

    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        return math.prod(input_shape[:-1]) * tt_flops_per_row(
            self.out_modes, self.in_modes, self.ranks, self.direction
        )

    def config(self) -> dict[str, Any]:
        return {
            "out_modes": list(self.out_modes),
            "in_modes": list(self.in_modes),
            "ranks": list(self.ranks),
        }

    def extra_repr(self) -> str:
        return (
            f"{self.in_features} → {self.out_features}, modes {self.out_modes}×"
            f"{self.in_modes}, TT ranks {self.ranks}"
        )


def padded_weight(
    weight: torch.Tensor, out_modes: tuple[int, ...], in_modes: tuple[int, ...]
) -> torch.Tensor:
    """``weight`` (out × in) zero-padded to (Π out_modes × Π in_modes)."""
    big_m, big_n = math.prod(out_modes), math.prod(in_modes)
    out, inp = weight.shape
    if (out, inp) == (big_m, big_n):
        return weight
    return F.pad(weight, (0, big_n - inp, 0, big_m - out))


def tt_flops_per_row(
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: Sequence[int],
    direction: str | None = None,
) -> int:
    """FLOPs of the TT forward for one input row (see the module docstring).

    ``direction`` "forward" contracts core 1 first: Σ_k 2·N_{>k}·M_{<k}·r_{k−1}·n_k·m_k·r_k;
    "reverse" contracts core d first: Σ_k 2·N_{<k}·M_{>k}·r_{k−1}·n_k·m_k·r_k; None = the cheaper.
    """
    d = len(out_modes)
    total = {"forward": 0, "reverse": 0}
    for k in range(d):
        core = 2 * ranks[k] * in_modes[k] * out_modes[k] * ranks[k + 1]
        total["forward"] += core * math.prod(in_modes[k + 1 :]) * math.prod(out_modes[:k])
        total["reverse"] += core * math.prod(in_modes[:k]) * math.prod(out_modes[k + 1 :])
    if direction is None:
        return min(total.values())
    if direction not in total:
        raise TensorslimError(f"TT direction must be 'forward' or 'reverse', got {direction!r}")
    return total[direction]


def cheaper_direction(
    out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]
) -> str:
    """The contraction order with fewer FLOPs ("forward" on a tie)."""
    forward = tt_flops_per_row(out_modes, in_modes, ranks, "forward")
    reverse = tt_flops_per_row(out_modes, in_modes, ranks, "reverse")
    return "forward" if forward <= reverse else "reverse"


def tt_params(out_modes: Sequence[int], in_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of core entries Σ_k r_{k−1} m_k n_k r_k."""
    return sum(
        ranks[k] * m * n * ranks[k + 1]
        for k, (m, n) in enumerate(zip(out_modes, in_modes, strict=True))
    )


__all__ = [
    "TTLinear",
    "full_tt_ranks",
    "padded_weight",
    "tt_flops_per_row",
    "tt_modes_for",
    "tt_params",
]
