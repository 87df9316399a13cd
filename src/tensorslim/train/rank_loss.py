"""The adversarial rank loss of RPG (Tian et al., NeurIPS 2023, arXiv 2311.17493).

For one layer with weight W viewed as (C_out, rest) and W̄ = W / ‖W‖_F (so Σ σ̄_i² = 1):

- take the SVD of W̄ *detached*: W̄ = U diag(σ̄) Vᵀ;
- choose k, the number of leading singular values kept, such that the discarded tail energy
  T_k = Σ_{i>k} σ̄_i² is closest to ``partial_k`` (k ∈ {0, …, r}, r = min(C_out, rest));
- W̄_k = U_k diag(σ̄_1..k) V_kᵀ is the best rank-k approximation (a constant for autograd);
- L_rank(W) = −‖W̄ − W̄_k‖²_F.

Minimising L_rank pushes W̄ away from its own best low-rank approximation, i.e. puts energy into the
tail directions: the "adversary" is the low-rank approximation, re-computed each time. Over
layers the loss is the plain mean; the training loss is task + λ·mean_l L_rank(W_l).

Gradient (through the normalisation; W̄_k fixed): with R = W̄ − W̄_k,
∂L/∂W = −(2/‖W‖_F)·(R − ⟨R, W̄⟩ W̄). Because ⟨R, W̄⟩ = ‖R‖²_F = T_k, the gradient lies in the tail
subspace, scaled by 1/‖W‖_F.

Cost: one SVD of a (C_out × rest) matrix per layer per call — min(m,n)²·max(m,n) flops.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from tensorslim.analysis.delta_rank import single_threaded
from tensorslim.errors import TensorslimError


def choose_k(normalized_sv: torch.Tensor, partial_k: float) -> int:
    """k ∈ {0, …, r} whose tail energy Σ_{i>k} σ̄_i² is closest to ``partial_k`` (ties: larger k).

    ``normalized_sv`` are the singular values of W̄, descending, with Σ σ̄_i² = 1.
    """
    if not 0.0 <= partial_k <= 1.0:
        raise TensorslimError(
            f"partial_k (tail energy fraction) must be in [0, 1], got {partial_k}"
        )
    energy = normalized_sv.double() ** 2
    # tails[k] = Σ_{i>k} σ̄_i² for k = 0..r (tails[0] = total, tails[r] = 0).
    suffix = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])
    tails = torch.cat([suffix, suffix.new_zeros(1)])
    gaps = (tails - partial_k).abs()
    best = float(gaps.min())
    # Ties go to the larger k (smaller discarded tail): the loss then targets the smallest
    # directions, which is the conservative choice.
    candidates = (gaps <= best + 1e-15).nonzero().reshape(-1)
    return int(candidates.max())


def layer_rank_loss(weight: torch.Tensor, partial_k: float, name: str = "layer") -> torch.Tensor:
    """−‖W̄ − W̄_k‖²_F for one weight (differentiable in ``weight``; the SVD is detached).

    Raises for NaN/Inf weights. An all-zero weight has no direction to push: returns 0 with a
    warning naming the layer.
    """
    matrix = weight.reshape(weight.shape[0], -1)
    norm = torch.linalg.matrix_norm(matrix.detach())
    if not torch.isfinite(norm):
        raise TensorslimError(f"rank loss: {name} has NaN or Inf weights")
    if float(norm) == 0.0:
        warnings.warn(f"rank loss: {name} has all weights zero; it adds nothing", stacklevel=2)
        return matrix.sum() * 0.0
    normalized = matrix / torch.linalg.matrix_norm(matrix)
    with torch.no_grad(), single_threaded():
        u, s, vh = torch.linalg.svd(normalized.detach(), full_matrices=False)
        k = choose_k(s, partial_k)
        approx = (u[:, :k] * s[:k]) @ vh[:k]
    return -((normalized - approx) ** 2).sum()


def adversarial_rank_loss(
    modules: Iterable[tuple[str, nn.Module]], partial_k: float
) -> torch.Tensor:
    """Mean over the given (name, layer) pairs of :func:`layer_rank_loss` of ``layer.weight``."""
    with single_threaded():
        losses = [layer_rank_loss(module.weight, partial_k, name) for name, module in modules]
    if not losses:
        raise TensorslimError("rank loss: no layers given")
    return torch.stack(losses).mean()
