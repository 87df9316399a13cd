"""Relative output error of an approximate weight, from the input Gram matrix alone.

A layer's weight viewed as the matrix M (out × d) maps each input row x ∈ R^d to M·x (a Linear:
x a token; a Conv2d: x an unfolded patch, M = K reshaped n × (c·kh·kw)). Over calibration rows
X (N × d) with Gram G = XᵀX,

    ‖(M − M̂) Xᵀ‖²_F = tr(Δ G Δᵀ),   Δ = M − M̂,         ‖M Xᵀ‖²_F = tr(M G Mᵀ),

so the relative output error ‖(M − M̂)Xᵀ‖_F / ‖MXᵀ‖_F needs no forward pass. For a truncated
SVD M = Σ σ_i u_i v_iᵀ the error of rank r is Σ_{i>r} σ_i² v_iᵀ G v_i (the u_i are orthonormal),
so one SVD gives the error of every rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.linear_like import is_linear_like, linear_weight


def weight_rows_matrix(module: nn.Module) -> torch.Tensor:
    """The matrix M (out × d) that multiplies the rows of :func:`input_rows` (float64)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TensorslimError(f"{type(module).__name__} has no weight to measure an error on")
    if is_linear_like(module):
        weight = linear_weight(module)  # (out, in) also for a weight stored (in, out)
    w = weight.detach().double()
    return w.reshape(w.shape[0], -1)


def quadratic_energy(matrix: torch.Tensor, gram: torch.Tensor) -> float:
    """tr(M G Mᵀ) = ‖M Xᵀ‖²_F, for M (out × d) and G (d × d)."""
    return float(((matrix @ gram) * matrix).sum())


def relative_output_error(
    matrix: torch.Tensor, approximation: torch.Tensor, gram: torch.Tensor
) -> float:
    """‖(M − M̂)Xᵀ‖_F / ‖MXᵀ‖_F from the Gram G = XᵀX (0 when the output energy is 0)."""
    m = matrix.double()
    reference = quadratic_energy(m, gram)
    if reference <= 0.0:
        return 0.0
    delta = m - approximation.double().reshape(m.shape)
    return math.sqrt(max(0.0, quadratic_energy(delta, gram)) / reference)


def svd_output_errors(matrix: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Relative output error of the rank-r truncated SVD of M, for r = 0 … min(out, d).

    Entry r is sqrt(Σ_{i>r} e_i / Σ_i e_i) with e_i = σ_i² v_iᵀ G v_i (float64); entry 0 is 1.
    """
    m = matrix.double()
    _, s, vh = torch.linalg.svd(m, full_matrices=False)
    return errors_from_energies(s.pow(2) * ((vh @ gram) * vh).sum(dim=1))


def errors_from_energies(energy: torch.Tensor) -> torch.Tensor:
    """Entry r = sqrt(Σ_{i>r} e_i / Σ_i e_i) for r = 0 … len(e), from the components' output
    energies e_i = σ_i² v_iᵀ G v_i (descending σ); all zeros when the output energy is 0."""
    energy = energy.double()
    total = float(energy.sum())
    if total <= 0.0:
        return torch.zeros(energy.numel() + 1, dtype=torch.float64)
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tail.clamp_min(0.0) / total).sqrt()
