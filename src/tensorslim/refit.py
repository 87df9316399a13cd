"""Layer-wise closed-form refits of low-rank factors to the inputs the compressed model produces.

After truncation each low-rank layer W ≈ U V (U: out × r, V: r × d) sees inputs X̃ from the
compressed layers before it instead of the original model's inputs X. Layer by layer, in module
order, the factors are refitted so the compressed layer reproduces the original layer's output
on the original inputs (rows of X and X̃ are the same tokens; the bias cancels), with a ridge
λ = ``ridge`` · tr(G̃)/d on G̃ = X̃ᵀX̃ (C = XᵀX̃):

- ``factors="right"`` (SVD-LLM's update of the right factor, U fixed):
  V* = argmin_V ‖X Wᵀ − X̃ Vᵀ Uᵀ‖²_F  ⇒  (UᵀU) V (G̃ + λI) = Uᵀ W C;
- ``factors="both"`` (sequential whitening: both factors, the rank kept): since
  ‖XWᵀ − X̃Ŵᵀ‖² + λ‖Ŵ‖² = const + ‖(Ŵ − M) L̃‖² with M = W C (G̃ + λI)⁻¹ and L̃ L̃ᵀ = G̃ + λI,
  the best rank-r Ŵ is SVD-LLM's whitened truncation of M under G̃ — the optimum over both
  factors, so never worse than ``"right"`` at λ = 0.

When X̃ = X (the first compressed layer) and the layer came from SVD-LLM, both give back the
layer it already has: whitening made the truncation optimal in output space. Each layer is
refitted after the ones before it, so later layers see the updated inputs; every pass stops the
forward at the layer it measures. The calibration rows should outnumber d several times (the
Gram of a wide layer from a few sentences overfits them).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
from torch import nn

from tensorslim.decompose.weighted_svd import weighted_factors, whitening
from tensorslim.errors import TensorslimError
from tensorslim.inputs import ForwardFn, call_on_batch, model_device, to_device
from tensorslim.layers.linear_like import is_linear_like, linear_weight
from tensorslim.layers.lowrank import LowRankLinear

# relative ridge (× tr(X̃ᵀX̃)/d) on the compressed inputs' Gram: 1e-4 regularises the wide
# layers' Grams (MiniLM's 1536-wide FFN input) where 1e-6 let a few calibration sentences be
# overfitted (bench/results/transformer_lowrank_refit.md); with 512 sentences and 1e-4 the refit
# lifts svd_llm at half the Linear params from ρ 0.746 to 0.777 before any distillation
DEFAULT_RIDGE = 1e-4
FACTORS = ("right", "both")


class _Captured(Exception):
    """Raised by a hook once it holds the layer input: the rest of the forward is not needed."""


def refit_right_factors(
    original: nn.Module,
    compressed: nn.Module,
    calibration: Iterable,
    *,
    batches: int = 16,
    ridge: float = DEFAULT_RIDGE,
    forward_fn: ForwardFn | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`refit_factors` with ``factors="right"`` (SVD-LLM's update, U kept)."""
    return refit_factors(
        original, compressed, calibration, factors="right", batches=batches, ridge=ridge,
        forward_fn=forward_fn,
    )  # fmt: skip


def refit_factors(
    original: nn.Module,
    compressed: nn.Module,
    calibration: Iterable,
    *,
    factors: str = "both",
    batches: int = 16,
    ridge: float = DEFAULT_RIDGE,
    forward_fn: ForwardFn | None = None,
) -> dict[str, dict[str, float]]:
    """Refit every :class:`LowRankLinear` of ``compressed`` that replaced a Linear (or HF
    ``Conv1D``) of ``original``, in module order (``compressed`` is changed in place):
    ``factors="right"`` the right factor, ``"both"`` both at the same rank (module docstring).

    Returns fqn → ``{"before": e0, "after": e1}``, the layer's relative output error
    ‖XWᵀ − X̃VᵀUᵀ‖/‖XWᵀ‖ on the calibration rows before and after its update.
    """
    if batches < 1:
        raise TensorslimError(f"refit batches must be ≥ 1, got {batches}")
    if factors not in FACTORS:
        raise TensorslimError(f"refit factors must be one of {', '.join(FACTORS)}, got {factors!r}")
    if not ridge >= 0.0:
        raise TensorslimError(f"refit ridge must be ≥ 0, got {ridge}")
    named = dict(original.named_modules())
    layers = [
        (fqn, m)
        for fqn, m in compressed.named_modules()
        if isinstance(m, LowRankLinear) and is_linear_like(named.get(fqn))
    ]
    if not layers:
        raise TensorslimError("the compressed model has no low-rank Linear to refit")
    modes = original.training, compressed.training
    original.eval(), compressed.eval()
    report = {}
    try:
        for fqn, layer in layers:
            grams = _paired_grams(original, compressed, fqn, calibration, batches, forward_fn)
            w = linear_weight(original.get_submodule(fqn)).detach().double()
            report[fqn] = _refit_layer(w, layer, grams, ridge, factors)
    finally:
        original.train(modes[0]), compressed.train(modes[1])
    return report


def _refit_layer(
    w: torch.Tensor,
    layer: LowRankLinear,
    grams: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ridge: float,
    factors: str,
) -> dict[str, float]:
    """Solve for one layer's new factors (float64); kept only if they lower its error."""
    cross, gram, energy = grams
    u = layer.up.weight.detach().double()
    v_old = layer.down.weight.detach().double()
    before = _relative_error(w, u @ v_old, cross, gram, energy)
    d = gram.shape[0]
    regularized = gram + ridge * float(torch.diagonal(gram).sum()) / d * torch.eye(
        d, dtype=gram.dtype
    )
    if factors == "right":
        # V = (UᵀU)⁻¹ Uᵀ W C (G̃ + λI)⁻¹; G̃ symmetric, so solve from the right by transposing
        left = torch.linalg.solve(u.T @ u, u.T @ w @ cross)
        u_new, v_new = u, torch.linalg.solve(regularized, left.T).T
    else:
        target = torch.linalg.solve(regularized, (w @ cross).T).T  # M = W C (G̃ + λI)⁻¹
        a, b = weighted_factors(target, whitening(regularized), u.shape[1])
        u_new, v_new = a, b.T
    after = _relative_error(w, u_new @ v_new, cross, gram, energy)
    if after <= before:  # the ridge can, in a degenerate case, make the update no better
        with torch.no_grad():
            layer.up.weight.copy_(u_new.to(layer.up.weight.dtype))
            layer.down.weight.copy_(v_new.to(layer.down.weight.dtype))
    return {"before": before, "after": min(before, after)}


def _relative_error(
    w: torch.Tensor,
    m: torch.Tensor,
    cross: torch.Tensor,
    gram: torch.Tensor,
    energy: torch.Tensor,
) -> float:
    """‖XWᵀ − X̃Mᵀ‖/‖XWᵀ‖ from G = XᵀX (``energy``), C = XᵀX̃ and G̃ = X̃ᵀX̃."""
    reference = float(((w @ energy) * w).sum())
    value = reference - 2 * float(((w @ cross) * m).sum()) + float(((m @ gram) * m).sum())
    return (max(0.0, value) / reference) ** 0.5 if reference > 0 else 0.0


def _paired_grams(
    original: nn.Module,
    compressed: nn.Module,
    fqn: str,
    calibration: Iterable,
    batches: int,
    forward_fn: ForwardFn | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """C = XᵀX̃, G̃ = X̃ᵀX̃ and G = XᵀX over the layer's input rows (float64, d × d)."""
    cross = gram = energy = None
    device = model_device(compressed)
    for batch in itertools.islice(calibration, batches):
        batch = to_device(batch, device)
        x = _layer_input(original, fqn, batch, forward_fn)
        x_tilde = _layer_input(compressed, fqn, batch, forward_fn)
        if x.shape != x_tilde.shape:
            raise TensorslimError(f"layer {fqn}: the two models fed it inputs of other shapes")
        c, g, e = x.T @ x_tilde, x_tilde.T @ x_tilde, x.T @ x
        cross = c if cross is None else cross + c
        gram = g if gram is None else gram + g
        energy = e if energy is None else energy + e
    if cross is None:
        raise TensorslimError("the calibration loader yielded no batch")
    return cross, gram, energy  # type: ignore[return-value]


def _layer_input(
    model: nn.Module, fqn: str, batch: object, forward_fn: ForwardFn | None
) -> torch.Tensor:
    """The rows (tokens × d, float64) ``model``'s layer ``fqn`` receives on ``batch``."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
        raise _Captured

    handle = model.get_submodule(fqn).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            call_on_batch(model, batch, forward_fn)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise TensorslimError(f"layer {fqn} never ran on a calibration batch")
    return captured[0]
