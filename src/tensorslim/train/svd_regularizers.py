"""Regularizers of SVD training (Yang et al., CVPR-W 2020), as functions and as one hook.

For a layer held as U (m × r), s (r), V (n × r):

- orthogonality  L_o(U, V) = (‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r²  — keeps U and V (near)
  orthonormal so that |s| stay the layer's singular values and energy pruning is meaningful;
- sparsity on s:  L1 ‖s‖₁,  Hoyer ‖s‖₁ / ‖s‖₂ − 1 (the official form),  Hoyer-square
  ‖s‖₁² / ‖s‖₂².  Hoyer and
  Hoyer-square are scale-invariant (they push towards few large values without shrinking all of
  them, unlike L1).

The model loss is  task + λo·Σ_layers L_o + λs·Σ_layers L_s,  summed over every SVD-form layer
(``SVDLinear``/``SVDConv2d``), only over the singular values still active. ``SVDRegularizerHook``
adds it inside any loop that calls ``TrainHook.extra_loss`` (the reference ``fit`` does); it
reaches the layers through ``unwrap`` so a DistributedDataParallel-wrapped model works, and it
stops with an error naming the layer when a singular value becomes NaN or Inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.layers.svd import SVDLayer, svd_layers
from tensorslim.train.hooks import TrainHook, unwrap
from tensorslim.train.loop import NonFiniteLossError

# Norms below this are treated as zero (an all-zero s has no defined Hoyer measure).
_EPS = 1e-12


def orthogonality_loss(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(‖UᵀU − I‖²_F + ‖VᵀV − I‖²_F) / r² for U (m × r), V (n × r)."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
        raise TensorslimError(
            f"orthogonality_loss needs U (m × r) and V (n × r), got {tuple(u.shape)} and "
            f"{tuple(v.shape)}"
        )
    r = u.shape[1]
    eye = torch.eye(r, device=u.device, dtype=u.dtype)
    gram_u = u.T @ u - eye
    gram_v = v.T @ v - eye
    return (gram_u.pow(2).sum() + gram_v.pow(2).sum()) / (r * r)


def l1_sparsity(s: torch.Tensor) -> torch.Tensor:
    """‖s‖₁."""
    return s.abs().sum()


def hoyer_sparsity(s: torch.Tensor) -> torch.Tensor:
    """‖s‖₁ / ‖s‖₂ − 1, as the official code reports it (0 for one nonzero, √r − 1 for a flat s;
    the constant leaves the gradient that of ‖s‖₁ / ‖s‖₂)."""
    return s.abs().sum() / torch.linalg.vector_norm(s).clamp_min(_EPS) - 1.0


def hoyer_square_sparsity(s: torch.Tensor) -> torch.Tensor:
    """‖s‖₁² / ‖s‖₂² (between 1 and r)."""
    return s.abs().sum().pow(2) / s.pow(2).sum().clamp_min(_EPS * _EPS)


SPARSITY_REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l1": l1_sparsity,
    "hoyer": hoyer_sparsity,
    "hoyer_square": hoyer_square_sparsity,
}


def sparsity_function(reg: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sparsity regularizer named ``reg`` ("l1", "hoyer", "hoyer_square")."""
    key = reg.strip().lower().replace("-", "_")
    if key not in SPARSITY_REGULARIZERS:
        raise TensorslimError(
            f"unknown sparsity regularizer '{reg}': use {', '.join(SPARSITY_REGULARIZERS)}"
        )
    return SPARSITY_REGULARIZERS[key]


def check_lambda(value: float, name: str) -> float:
    """A regularizer weight must be a finite number ≥ 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TensorslimError(f"{name} must be a finite number ≥ 0, got {value!r}")
    if value < 0:
        raise TensorslimError(f"{name} must be ≥ 0, got {value}: use 0 to switch the term off")
    return float(value)


class NonFiniteSingularValuesError(NonFiniteLossError):
    """A layer's singular values became NaN or Inf; training stopped."""


def check_finite_layers(layers: list[tuple[str, SVDLayer]], where: str = "") -> None:
    """Raise :class:`NonFiniteSingularValuesError` naming the first layer whose U, s or V holds
    NaN/Inf."""
    if not layers:
        return
    # one device sync for the common case; the per-layer search runs only after a failure
    flags = [torch.isfinite(getattr(m, n)).all() for _, m in layers for n in ("s", "U", "V")]
    if bool(torch.stack(flags).all()):
        return
    for fqn, layer in layers:
        for name in ("s", "U", "V"):
            tensor = getattr(layer, name)
            if not bool(torch.isfinite(tensor).all()):
                raise NonFiniteSingularValuesError(
                    f"layer '{fqn}': {name} contains NaN or Inf — lower the learning rate or λs"
                    f"{where}"
                )


def svd_regularization(
    model: nn.Module,
    lambda_o: float,
    lambda_s: float,
    reg: str = "hoyer",
    *,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """λo·Σ L_o + λs·Σ L_s over the SVD layers of ``model`` (a DDP wrapper is looked through).

    Returns the total (a 0-d tensor carrying gradients) and the unweighted sums
    ``{"orthogonality": Σ L_o, "sparsity": Σ L_s}`` (detached). A term whose weight is 0 is not
    computed (its entry is 0).
    """
    lambda_o = check_lambda(lambda_o, "lambda_o")
    lambda_s = check_lambda(lambda_s, "lambda_s")
    sparsity = sparsity_function(reg)
    layers = svd_layers(unwrap(model))
    if not layers:
        raise TensorslimError(
            "the model has no SVD-form layers: convert it first "
            "(tensorslim.train.svd_pipeline.to_svd_model)"
        )
    if check_finite:
        check_finite_layers(layers)
    first = layers[0][1].s
    ortho = first.new_zeros(())
    sparse = first.new_zeros(())
    for _, layer in layers:
        u, s, v = layer.active_factors()
        if lambda_o > 0:
            ortho = ortho + orthogonality_loss(u, v)
        if lambda_s > 0:
            sparse = sparse + sparsity(s)
    total = lambda_o * ortho + lambda_s * sparse
    return total, {"orthogonality": ortho.detach(), "sparsity": sparse.detach()}


class SVDRegularizerHook(TrainHook):
    """Adds λo·Σ L_o + λs·Σ L_s to the loss each step; logs both sums at each epoch's end.

    ``where`` is appended to the error message when a singular value turns NaN/Inf (the
    pipeline puts the path of the last good checkpoint there).

    ``sparsity_gate`` (optional) is asked every ``gate_every`` steps whether the spectra are
    already sparse enough (e.g. the model would meet its FLOPs budget after pruning a small
    energy); while it answers True the sparsity term is left out (λs acts as 0) and only the
    orthogonality term is added. The gate must depend only on the weights, so that every
    DistributedDataParallel rank takes the same decision.
    """

    def __init__(
        self,
        lambda_o: float = 1.0,
        lambda_s: float = 0.0,
        reg: str = "hoyer",
        where: str = "",
        *,
        sparsity_gate: Callable[[], bool] | None = None,
        gate_every: int = 10,
    ) -> None:
        self.lambda_o = check_lambda(lambda_o, "lambda_o")
        self.lambda_s = check_lambda(lambda_s, "lambda_s")
        sparsity_function(reg)
        if not isinstance(gate_every, int) or gate_every < 1:
            raise TensorslimError(f"gate_every must be an integer ≥ 1, got {gate_every!r}")
        self.reg = reg
        self.where = where
        self.sparsity_gate = sparsity_gate
        self.gate_every = gate_every
        self._sparsity_on = True
        self._steps = 0
        self._steps_on = 0

    def _lambda_s_now(self, step: int) -> float:
        """λs at ``step``: 0 while the gate says the spectra are sparse enough."""
        if self.sparsity_gate is not None and self.lambda_s > 0 and step % self.gate_every == 0:
            self._sparsity_on = not bool(self.sparsity_gate())
        self._steps += 1
        self._steps_on += int(self._sparsity_on)
        return self.lambda_s if self._sparsity_on else 0.0

    def __call__(self, model: nn.Module) -> torch.Tensor:
        """The weighted regularization of ``model`` (same as :func:`svd_regularization`)."""
        return svd_regularization(model, self.lambda_o, self.lambda_s, self.reg)[0]

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        layers = svd_layers(unwrap(model))
        if not layers:
            raise TensorslimError(
                "SVDRegularizerHook found no SVD-form layers: convert the model first "
                "(tensorslim.train.svd_pipeline.to_svd_model)"
            )
        check_finite_layers(layers, self.where)
        lambda_s = self._lambda_s_now(step)
        if self.lambda_o == 0 and lambda_s == 0:
            return None
        return svd_regularization(model, self.lambda_o, lambda_s, self.reg, check_finite=False)[0]

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        # measured once on the end-of-epoch weights (both terms, whatever their weights), so
        # a run without the orthogonality loss still shows how far U and V drift
        with torch.no_grad():
            _, parts = svd_regularization(model, 1.0, 1.0, self.reg, check_finite=False)
        key = self.reg.strip().lower().replace("-", "_")
        row = {
            "reg_orthogonality": float(parts["orthogonality"]),
            f"reg_{key}": float(parts["sparsity"]),
        }
        if self.sparsity_gate is not None and self._steps > 0:
            # share of this epoch's steps that carried the sparsity term
            row["sparsity_on_share"] = self._steps_on / self._steps
            self._steps = self._steps_on = 0
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"lambda_o": self.lambda_o, "lambda_s": self.lambda_s, "reg": self.reg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the weights are the caller's settings; nothing in this hook changes during training
        return None
