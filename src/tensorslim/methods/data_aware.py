"""Data-aware low-rank SVD of trained Linear layers (and HF ``Conv1D``, which reaches every
method as an equivalent Linear): ASVD, SVD-LLM and FWSVD.

All three truncate the SVD of a weighted weight R·W·T (:mod:`tensorslim.decompose.weighted_svd`)
and build the same :class:`~tensorslim.layers.lowrank.LowRankLinear` as plain SVD; they differ
only in the weighting, computed from the calibration statistics the planner collects:

- ``asvd``: T = diag(mean|x|^α) (``alpha``, default 0.5; α = 0 is plain SVD);
- ``svd_llm``: T = Cholesky factor of the input Gram XᵀX (a small ridge only when it is not
  positive definite), so every dropped σ² is output error;
- ``fwsvd``: R = diag(√ row sums of the Fisher diagonal) (needs ``loss_fn`` at planning).

Candidates are ranks on the SVD method's ladder, priced with its FLOP and parameter formulas,
each with its exact output-space error ‖(W − Ŵ)X‖/‖WX‖ on the calibration data (one weighted
SVD per layer gives every rank's error), so the global allocator spreads a params or FLOPs
budget over layers by what the data says. ``allocation="sensitivity"`` (the default of asvd
and svd_llm) has the planner weight each layer's squared error by how much the model's output
moves per unit of it (:mod:`tensorslim.planner.sensitivity`), so the budget goes where the
output is sensitive; ``allocation="layer"`` (fwsvd's default, and ``preset="paper"``: the
papers allocate per layer, or uniformly) counts every layer's relative error alike.
Building needs the statistics again: ``ts.apply`` takes them from the plan made in this
process, or recomputes them from ``calibration=``; loading a saved model needs none (its
weights are in safetensors).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from tensorslim.analysis.calibration import ABS_MEAN, FISHER, GRAM
from tensorslim.analysis.output_error import weight_rows_matrix
from tensorslim.decompose.weighted_svd import (
    Weighting,
    activation_scaling,
    fisher_row_weights,
    weighted_factors,
    weighted_output_errors,
    whitening,
)
from tensorslim.errors import TensorslimError
from tensorslim.facts import OUTPUT_ERROR, Config, LayerInfo, LayerStats, Option
from tensorslim.layers.composite import is_composite
from tensorslim.layers.lowrank import LowRankLinear
from tensorslim.methods.base import Method
from tensorslim.methods.presets import Preset
from tensorslim.methods.svd import SVDMethod, _ladder, _params

ALLOCATIONS = ("sensitivity", "layer")
# ASVD, SVD-LLM and FWSVD compare layers by their own (relative) errors or keep one ratio for all
PAPER = Preset(
    settings={"allocation": "layer"},
    description="every layer's relative output error counts alike in the allocation",
    source="Yuan et al. 2023 (ASVD), Wang et al. 2024 (SVD-LLM), Hsu et al. 2022 (FWSVD)",
)


@dataclass
class DataAwareSVD(Method):
    """Shared candidates and build of the weighted-SVD methods; subclasses give the weighting.

    ``allocation``: ``"sensitivity"`` (errors weighted by the output's sensitivity to each
    layer when a budget is allocated) or ``"layer"`` (relative errors compared as they are).
    """

    builds: ClassVar[tuple[type[nn.Module], ...]] = (LowRankLinear,)
    needs_statistics_to_build: ClassVar[bool] = True
    presets: ClassVar[Mapping[str, Preset]] = {"paper": PAPER}
    allocation: str = "sensitivity"

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise TensorslimError(
                f"{self.name} allocation must be one of {', '.join(ALLOCATIONS)}, got "
                f"{self.allocation!r}"
            )

    def weighs_layers(self) -> bool:
        return self.allocation == "sensitivity"

    @abc.abstractmethod
    def weighting(self, module: nn.Module, stats: LayerStats) -> Weighting:
        """R and T for this layer from its calibration statistics."""

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if is_composite(module):
            return composite_statistics_reason(self.name, module)
        return f"{type(module).__name__} is not a Linear ({self.name} factorizes Linear layers)"

    def _checked(self, stats: LayerStats | None, info: LayerInfo | None) -> LayerStats:
        where = f" for {info.fqn}" if info is not None else ""
        if stats is None:
            raise TensorslimError(
                f"method '{self.name}' needs calibration data{where}: pass calibration= (a loader "
                "of real batches) to plan/apply, or --calibration-batches in the CLI"
            )
        missing = sorted(n for n in self.calibration_needs if getattr(stats, n) is None)
        if missing:
            raise TensorslimError(
                f"method '{self.name}' needs the calibration statistic(s) {missing}{where}"
                + (" (give loss_fn= for the Fisher diagonal)" if FISHER in missing else "")
            )
        return stats

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        stats = self._checked(stats, info)
        matrix = weight_rows_matrix(module)
        errors = weighted_output_errors(matrix, self.weighting(module, stats), stats.gram)
        full = min(matrix.shape)
        # the SVD method prices the same LowRankLinear: FLOPs are linear in the rank
        unit_flops = SVDMethod._skeleton(module, 1, "channel", meta=True).analytic_flops(
            info.input_shape
        )
        return [
            Option(
                method=self.name,
                config={"rank": rank},
                params=_params(module, rank, "channel"),
                flops=unit_flops * rank * info.calls,
                error=float(errors[rank]),
                label=f"rank {rank}/{full}",
                extra={"full_rank": full},
                error_space=OUTPUT_ERROR,
            )
            for rank in _ladder(full)
        ]

    def build(
        self,
        module: nn.Module,
        config: Config,
        info: LayerInfo | None,
        *,
        init: bool = True,
        stats: LayerStats | None = None,
    ) -> nn.Module:
        rank = config.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TensorslimError(f"rank {rank!r} in the plan is not a positive integer")
        if not init:
            return SVDMethod._skeleton(module, rank, "channel")
        stats = self._checked(stats, info)
        a, b = weighted_factors(weight_rows_matrix(module), self.weighting(module, stats), rank)
        return LowRankLinear.from_factors(module, a, b)  # type: ignore[arg-type]


@dataclass
class ASVDMethod(DataAwareSVD):
    """ASVD (Yuan et al. 2023): SVD of W·S, S = diag(mean|x|^α), S⁻¹ folded into the right
    factor. ``alpha`` ≥ 0 (0.5 as in the paper; 0 is plain SVD)."""

    name: ClassVar[str] = "asvd"
    description: ClassVar[str] = "activation-aware SVD: input channels scaled by mean|x|^α"
    calibration_needs: ClassVar[frozenset[str]] = frozenset({GRAM, ABS_MEAN})
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        alpha = self.alpha
        if not (isinstance(alpha, int | float) and math.isfinite(alpha)) or alpha < 0:
            raise TensorslimError(f"asvd alpha must be a finite number ≥ 0, got {self.alpha!r}")

    def weighting(self, module: nn.Module, stats: LayerStats) -> Weighting:
        assert stats.abs_mean is not None
        return activation_scaling(stats.abs_mean, float(self.alpha))


@dataclass
class SVDLLMMethod(DataAwareSVD):
    """SVD-LLM (Wang et al. 2024): SVD of W·L with L Lᵀ = XᵀX, right factor Vᵀ L⁻¹; the
    truncation error is the output error, so ranks are chosen in output space."""

    name: ClassVar[str] = "svd_llm"
    description: ClassVar[str] = "truncation-aware whitening: SVD of W·chol(XᵀX)"
    calibration_needs: ClassVar[frozenset[str]] = frozenset({GRAM})

    def weighting(self, module: nn.Module, stats: LayerStats) -> Weighting:
        assert stats.gram is not None
        return whitening(stats.gram)


@dataclass
class FWSVDMethod(DataAwareSVD):
    """FWSVD (Hsu et al. 2022): rows weighted by √(Σ_j F_ij) of the Fisher diagonal F (the
    squared gradients of a loss on the calibration batches)."""

    name: ClassVar[str] = "fwsvd"
    description: ClassVar[str] = "Fisher-weighted SVD: rows weighted by the Fisher diagonal"
    calibration_needs: ClassVar[frozenset[str]] = frozenset({GRAM, FISHER})
    # per-layer errors by default: on MiniLM the sensitivity weights cost FWSVD ρ (0.41 → 0.35
    # at half the Linear params, bench/results/transformer_lowrank_paper.md), whose Fisher rows
    # already weigh the outputs by the same loss
    allocation: str = "layer"

    def weighting(self, module: nn.Module, stats: LayerStats) -> Weighting:
        assert stats.fisher is not None
        return fisher_row_weights(stats.fisher)


def composite_statistics_reason(method: str, module: nn.Module) -> str:
    """Why a data-aware method keeps an attention or recurrent layer dense.

    Its weighting needs the statistics of the inputs each weight matrix multiplies, and the
    calibration collects them at Linear/Conv inputs only: inside ``nn.MultiheadAttention`` the
    in-projection sees the query/key/value inputs and the out-projection the attention output;
    inside an LSTM/GRU the input-to-hidden matrices see x_t and the hidden-to-hidden ones
    h_{t-1}, which arises in the layer's own loop. Plain ``svd`` factorizes these by weight.
    """
    if isinstance(module, nn.MultiheadAttention):
        inputs = "its query/key/value inputs (in-projection) and attention output (out_proj)"
    else:
        inputs = "its inputs x_t (input-to-hidden) and hidden states h_{t-1} (hidden-to-hidden)"
    return (
        f"kept dense: {method} weighs each weight matrix by statistics of the inputs it "
        f"multiplies, and calibration does not collect them inside a "
        f"{type(module).__name__} ({inputs}); plain svd compresses it by weight"
    )
