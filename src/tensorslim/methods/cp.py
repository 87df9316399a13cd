"""The ``cp`` method: CP decomposition of conv kernels (Lebedev et al., ICLR 2015).

Per layer:

- k×k convs (groups = 1) → :class:`CPConv2d` (1×1 → depthwise kh×1 → depthwise 1×kw → 1×1)
  from this project's CP-ALS (:func:`tensorslim.decompose.cp.cp_als`);
- 1×1 convs and Linear layers → delegated to the ``svd`` method (a CP of a matrix is its SVD),
  options with ``method="svd"``;
- grouped convs stay dense (the reason is kept in the plan).

Rank rules (setting ``rank_rule``):

- ``"auto"`` (default): with ``rank`` set, as ``"fixed"``; otherwise the budget ladder plus the
  VBMF-matched rank, which is the choice when the plan has no budget;
- ``"vbmf"``: one option whose CP rank has the parameter count of the Tucker-2 decomposition at
  the (weakened) EVBMF ranks, R = (c·R_in + R_in·R_out·kh·kw + R_out·n)/(c + kh + kw + n):
  VBMF measures how much of the kernel is signal, the CP rank then spends the same storage;
- ``"budget"``: the ladder only — ``ladder`` fractions of the rank whose CP layer would cost
  as many FLOPs as the dense conv;
- ``"fixed"``: ``rank``.

Planning solves a layer's ranks along one warm-started ALS path, smallest first, each rank
starting from the previous solution plus components of its residual
(:func:`tensorslim.decompose.cp_path.cp_als_path`); a single rank is exactly :func:`cp_als`.
The instance that planned keeps the path for ``build`` (``apply`` then decomposes nothing);
without it ``build`` replays the path up to the chosen rank, which gives the same factors.

The error of an option is the relative Frobenius error of the CP-ALS result itself. When ALS
meets a degenerate problem (diverging, cancelling components) the ``on_degenerate`` policy of
:func:`cp_als` applies and the option's ``extra`` records ``degenerate``/``stabilized``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.analysis.output_error import relative_output_error, weight_rows_matrix
from tensorslim.decompose.cp import CPDegeneracyWarning, CPResult, cp_als, cp_to_tensor
from tensorslim.decompose.cp_path import cp_als_path
from tensorslim.errors import TensorslimError
from tensorslim.facts import OUTPUT_ERROR, Config, LayerStats
from tensorslim.layers.cp import CPConv2d, conv_structure_reason
from tensorslim.methods.base import LayerInfo, Method, Option, require_conv2d
from tensorslim.methods.planned import Factorizations
from tensorslim.methods.registry import get_method
from tensorslim.methods.tucker import (
    TuckerMethod,
    effective_rule,
    is_pointwise,
    svd_fallback,
    validate_rank_settings,
)

DEFAULT_LADDER = (0.04, 0.08, 0.13, 0.2, 0.3, 0.45, 0.65)


@dataclass
class CPMethod(Method):
    """CP decomposition of convolutions (see the module docstring)."""

    name: ClassVar[str] = "cp"
    choice_noun: ClassVar[str] = "ranks"
    choice_hint: ClassVar[str] = "a rank rule (--set rank_rule=vbmf or --set rank=8)"
    description: ClassVar[str] = (
        "CP of conv kernels (1×1 → depthwise kh×1 → depthwise 1×kw → 1×1), ALS ranks by budget"
    )
    builds: ClassVar[tuple[type[nn.Module], ...]] = (CPConv2d,)
    # Four ranks per conv and a short ALS: the demo must plan in seconds.
    demo_settings: ClassVar[dict[str, Any] | None] = {
        "rank_rule": "budget",
        "ladder": [0.1, 0.2, 0.35, 0.55],
        "max_iter": 40,
    }
    rank_rule: str = "auto"
    rank: int | None = None
    weaken: float = 1.0
    min_rank: int = 1
    ladder: list[float] = field(default_factory=lambda: list(DEFAULT_LADDER))
    # ALS budget per rank: planning runs one ALS per ladder rank, so keep it moderate (fine-tuning
    # follows anyway); raise max_iter / lower tol for a closer fit.
    max_iter: int = 150
    tol: float = 1e-4
    on_degenerate: str = "stabilize"
    seed: int = 0
    # the planning instance's decompositions, for its own build (see methods/planned.py)
    factorizations: Factorizations = field(
        default_factory=Factorizations, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        validate_rank_settings(self.name, self.rank_rule, self.rank, self.weaken, self.min_rank)
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            raise TensorslimError(f"cp: rank must be a positive integer, got {self.rank}")
        if isinstance(self.ladder, int | float):
            self.ladder = [float(self.ladder)]
        self.ladder = [float(f) for f in self.ladder]
        if not self.ladder or any(not 0 < f <= 1 for f in self.ladder):
            raise TensorslimError(f"cp: ladder fractions must be in (0, 1], got {self.ladder}")
        if self.max_iter < 1 or self.tol < 0:
            raise TensorslimError(
                f"cp: need max_iter ≥ 1 and tol ≥ 0 ({self.max_iter}, {self.tol})"
            )
        if self.on_degenerate not in ("stabilize", "reduce_rank", "warn", "raise"):
            raise TensorslimError(
                f"cp: on_degenerate must be stabilize, reduce_rank, warn or raise: "
                f"{self.on_degenerate}"
            )

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.Conv2d):
            return conv_structure_reason(module)
        return f"{type(module).__name__} is not a Linear or Conv2d"

    # ----- decompositions (one warm-started path per layer, kept for build) ------------------
    def decompose_ranks(self, weight: torch.Tensor, ranks: list[int]) -> dict[int, CPResult]:
        """CP-ALS of ``weight`` at every rank of ``ranks`` with this method's settings.

        One warm-started path (:func:`tensorslim.decompose.cp_path.cp_als_path`): each rank
        starts from the previous one's solution; a single rank is exactly :func:`cp_als`.
        ``on_degenerate="reduce_rank"`` solves each rank on its own (a path cannot drop
        components). Degeneracy warnings are recorded on the results (``degenerate``,
        ``stabilized``), not shown.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CPDegeneracyWarning)
            if self.on_degenerate == "reduce_rank":
                return {r: self._cp_als(weight, r) for r in sorted(set(ranks))}
            return cp_als_path(weight, ranks, **self._als_options())

    def _cp_als(self, weight: torch.Tensor, rank: int) -> CPResult:
        return cp_als(weight, rank, **self._als_options())

    def _als_options(self) -> dict[str, Any]:
        """The ALS settings a single decomposition and a rank path both take."""
        return {
            "max_iter": self.max_iter,
            "tol": self.tol,
            "on_degenerate": self.on_degenerate,
            "seed": self.seed,
        }

    def _layer_results(
        self, module: nn.Conv2d, info: LayerInfo | None, up_to: int | None = None
    ) -> dict[int, CPResult]:
        """The path of ``module``'s ranks (all, or those ≤ ``up_to`` plus ``up_to`` itself).

        Served from this instance's planning store when it holds them; the path is a pure
        function of the weight, the ranks and the settings, so recomputing it (a plan loaded
        in another process) gives the same factors.
        """
        weight = module.weight.detach()
        fqn = info.fqn if info is not None else None
        stored = self.factorizations.get(fqn, weight)
        if stored is not None and (up_to is None or up_to in stored):
            return stored
        ranks = self._ranks(module, info)[0] if info is not None else []
        if up_to is not None:
            ranks = [r for r in ranks if r < up_to] + [up_to]
        return self.decompose_ranks(weight, ranks)

    def vbmf_rank(self, module: nn.Conv2d) -> int:
        """CP rank with the parameter count of Tucker-2 at the weakened EVBMF ranks."""
        n, c, kh, kw = module.weight.shape
        ro, ri = TuckerMethod(weaken=self.weaken, min_rank=self.min_rank).vbmf_ranks(
            module.weight.detach()
        )
        tucker_params = c * ri + ri * ro * kh * kw + ro * n
        return max(self.min_rank, round(tucker_params / (c + kh + kw + n)))

    def _skeleton(
        self,
        module: nn.Conv2d,
        rank: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> CPConv2d:
        return CPConv2d(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            rank,
            module.stride,
            module.padding,
            module.dilation,
            module.bias is not None,
            module.padding_mode,
            device=device,
            dtype=dtype,
        )

    def _ranks(self, module: nn.Conv2d, info: LayerInfo) -> tuple[list[int], int | None, int, int]:
        """(ranks to offer, the rule's default rank or None, FLOPs per unit rank, the rank
        whose CP layer costs as many FLOPs as the dense conv)."""
        rule = effective_rule(self.rank_rule, self.rank)
        per_rank = (
            self._skeleton(module, 1, torch.device("meta")).analytic_flops(info.input_shape)
            * info.calls
        )
        equal_rank = max(1, info.flops // max(per_rank, 1))  # info.flops: summed over calls
        if rule == "fixed":
            assert self.rank is not None
            return [self.rank], self.rank, per_rank, equal_rank
        if rule == "vbmf":
            rank = self.vbmf_rank(module)
            return [rank], rank, per_rank, equal_rank
        ranks = sorted({max(1, round(f * equal_rank)) for f in self.ladder})
        default = self.vbmf_rank(module) if rule == "auto" else None
        if default is not None and default not in ranks:
            ranks = sorted({*ranks, default})
        return ranks, default, per_rank, equal_rank

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        rule = effective_rule(self.rank_rule, self.rank)
        if is_pointwise(module):
            return svd_fallback(module, info, rule, self.rank, self.weaken, self.min_rank)
        assert isinstance(module, nn.Conv2d)
        n, c, kh, kw = module.weight.shape
        ranks, default, per_rank, equal_rank = self._ranks(module, info)
        results = self.decompose_ranks(module.weight.detach(), ranks)
        self.factorizations.put(info.fqn, module.weight, results)
        bias = module.bias.numel() if module.bias is not None else 0
        options = []
        for rank in ranks:
            result = results[rank]
            extra: dict[str, Any] = {
                "iterations": result.iterations,
                "converged": result.converged,
                "equal_flops_rank": int(equal_rank),
            }
            if result.degenerate or result.stabilized:
                extra.update(
                    degenerate=True, stabilized=result.stabilized, effective_rank=result.rank
                )
            if rank == default:
                extra["default"] = True
            options.append(
                Option(
                    method=self.name,
                    config={"rank": rank},
                    params=rank * (c + kh + kw + n) + bias,
                    flops=per_rank * rank,
                    error=float(result.rel_error),
                    label=f"CP rank {rank}",
                    extra=extra,
                )
            )
        return options

    def output_errors(
        self, module: nn.Module, info: LayerInfo, options: list[Option], stats: LayerStats
    ) -> list[Option]:
        """Output-space errors of the planned decompositions (no second decomposition)."""
        if is_pointwise(module):  # planned as the svd method plans it
            return get_method("svd").output_errors(module, info, options, stats)
        require_conv2d(self.name, module)
        assert stats.gram is not None
        results = self._layer_results(module, info)
        reference = weight_rows_matrix(module)
        measured = []
        for option in options:
            rank = int(option.config["rank"])
            result = results.get(rank) or self._layer_results(module, info, rank)[rank]
            approx = cp_to_tensor(result.weights, result.factors)
            error = relative_output_error(reference, approx, stats.gram)
            measured.append(dataclasses.replace(option, error=error, error_space=OUTPUT_ERROR))
        return measured

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        require_conv2d(self.name, module)
        try:
            rank = int(config["rank"])
        except (KeyError, TypeError, ValueError):
            raise TensorslimError(f"cp config needs an integer rank, got {config}") from None
        if rank < 1:
            raise TensorslimError(f"cp rank must be ≥ 1, got {rank}")
        if not init:
            return self._skeleton(module, rank, module.weight.device, module.weight.dtype)
        fqn = info.fqn if info is not None else None
        stored = self.factorizations.take(fqn, module.weight)
        if stored is not None and rank in stored:
            result = stored[rank]
        else:
            result = self._layer_results(module, info, rank)[rank]
        return CPConv2d.from_dense(module, rank, result=result)


__all__ = ["CPMethod"]
