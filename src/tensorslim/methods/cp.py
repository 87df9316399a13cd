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
  as many FLOPs as the dense conv (each rank is a real CP-ALS run, cached by kernel content);
- ``"fixed"``: ``rank``.

The error of an option is the relative Frobenius error of the CP-ALS result itself. When ALS
meets a degenerate problem (diverging, cancelling components) the ``on_degenerate`` policy of
:func:`cp_als` applies and the option's ``extra`` records ``degenerate``/``stabilized``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tensorslim.decompose.cp import CPDegeneracyWarning, CPResult, cp_als
from tensorslim.errors import TensorslimError
from tensorslim.facts import Config, LayerStats
from tensorslim.layers.cp import CPConv2d, conv_structure_reason
from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.tucker import (
    LRUCache,
    TuckerMethod,
    effective_rule,
    fingerprint,
    is_pointwise,
    pick_default,
    svd_fallback,
    validate_rank_settings,
)

DEFAULT_LADDER = (0.04, 0.08, 0.13, 0.2, 0.3, 0.45, 0.65)
_RESULTS = LRUCache(512)


@dataclass
class CPMethod(Method):
    """CP decomposition of convolutions (see the module docstring)."""

    name: ClassVar[str] = "cp"
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

    # ----- decompositions (cached by kernel content and solver settings) ----------------------
    def decompose(self, weight: torch.Tensor, rank: int) -> tuple[CPResult, list[str]]:
        """CP-ALS of ``weight`` at ``rank`` with this method's settings, and its warnings."""
        key = (fingerprint(weight), rank, self.max_iter, self.tol, self.on_degenerate, self.seed)

        def run() -> tuple[CPResult, list[str]]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", CPDegeneracyWarning)
                result = cp_als(
                    weight,
                    rank,
                    max_iter=self.max_iter,
                    tol=self.tol,
                    on_degenerate=self.on_degenerate,  # type: ignore[arg-type]
                    seed=self.seed,
                )
            return result, [str(w.message) for w in caught]

        return _RESULTS.get_or_compute(key, run)

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

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        rule = effective_rule(self.rank_rule, self.rank)
        if is_pointwise(module):
            return svd_fallback(module, info, rule, self.rank, self.weaken, self.min_rank)
        assert isinstance(module, nn.Conv2d)
        weight = module.weight.detach()
        n, c, kh, kw = weight.shape
        per_rank = (
            self._skeleton(module, 1, torch.device("meta")).analytic_flops(info.input_shape)
            * info.calls
        )
        dense_flops = info.flops  # already summed over all calls
        equal_rank = max(1, dense_flops // max(per_rank, 1))
        default: int | None
        if rule == "fixed":
            assert self.rank is not None
            ranks = [self.rank]
            default = self.rank
        elif rule == "vbmf":
            ranks = [self.vbmf_rank(module)]
            default = ranks[0]
        else:
            ranks = sorted({max(1, round(f * equal_rank)) for f in self.ladder})
            default = None
            if rule == "auto":
                default = self.vbmf_rank(module)
                if default not in ranks:
                    ranks = sorted({*ranks, default})
        bias = module.bias.numel() if module.bias is not None else 0
        options = []
        for rank in ranks:
            result, caught = self.decompose(weight, rank)
            extra: dict[str, Any] = {
                "iterations": result.iterations,
                "converged": result.converged,
                "equal_flops_rank": int(equal_rank),
            }
            if result.degenerate or result.stabilized or caught:
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

    def choose_without_budget(self, options: list[Option], info: LayerInfo) -> Option | None:
        chosen = pick_default(options)
        if chosen is not None:
            return chosen
        if len(options) == 1:
            return options[0]
        raise TensorslimError(
            f"cp with rank_rule 'budget' needs a budget (e.g. --budget flops=0.5) to choose among "
            f"{len(options)} ranks for {info.fqn}; or use rank_rule vbmf or a rank"
        )

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        if not isinstance(module, nn.Conv2d):
            raise TensorslimError(
                f"cp builds Conv2d layers only, got {type(module).__name__} (Linear and 1×1 "
                "convs go through the svd method)"
            )
        try:
            rank = int(config["rank"])
        except (KeyError, TypeError, ValueError):
            raise TensorslimError(f"cp config needs an integer rank, got {config}") from None
        if rank < 1:
            raise TensorslimError(f"cp rank must be ≥ 1, got {rank}")
        if not init:
            return self._skeleton(module, rank, module.weight.device, module.weight.dtype)
        result, _ = self.decompose(module.weight.detach(), rank)
        return CPConv2d.from_dense(module, rank, result=result)


__all__ = ["CPMethod"]
