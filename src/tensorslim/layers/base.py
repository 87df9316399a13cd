"""The contract every structured layer of tensorslim honours.

A structured layer replaces one dense ``nn.Linear`` or ``nn.Conv2d``. It states its own cost
analytically, because ``torch.utils.flop_counter`` cannot see every kind of work (an elementwise
multiply followed by a sum counts as zero, a masked weight counts as dense).

Convention: 2 FLOPs per multiply-add; FLOPs are for the whole input batch the shape describes.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn


class StructuredLayer(nn.Module, abc.ABC):
    """Base class of structured replacements of dense layers.

    Subclasses implement:
    - ``to_dense()`` → the equivalent ``nn.Linear`` / ``nn.Conv2d`` (same input/output map);
    - ``analytic_flops(input_shape)`` → FLOPs (2 per multiply-add) for an input of that shape;
    - ``config()`` → a JSON-serialisable dict from which the plan can rebuild the structure;
    and may override ``analytic_params()`` (default: number of parameter elements) and
    ``nonzero_params()`` (default: same as ``analytic_params``; sparse layers count nonzeros).
    """

    @abc.abstractmethod
    def to_dense(self) -> nn.Module:
        """The equivalent dense layer (weights multiplied out)."""

    @abc.abstractmethod
    def analytic_flops(self, input_shape: tuple[int, ...]) -> int:
        """FLOPs (2 per multiply-add) of one forward pass on an input of ``input_shape``."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable structure description (ranks, scheme, chain, ...)."""

    def analytic_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def nonzero_params(self) -> int:
        return self.analytic_params()


def dense_weight_error(dense: nn.Module, structured: StructuredLayer) -> float:
    """Relative Frobenius error ‖W − Ŵ‖_F / ‖W‖_F between a dense layer and its replacement."""
    w = dense.weight.detach()
    w_hat = structured.to_dense().weight.detach().to(w.dtype)
    return float(torch.linalg.vector_norm(w - w_hat) / torch.linalg.vector_norm(w).clamp_min(1e-30))


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """The dense ``nn.Linear`` equivalent of a structured linear layer.

    ``weight`` (out, in) and ``bias`` (out) are copied into the new layer (same device and dtype).
    """
    out_features, in_features = weight.shape
    dense = nn.Linear(
        in_features, out_features, bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    return dense
