"""The ``tt`` method: tensor-train Linear layers (Novikov et al., NeurIPS 2015).

Per layer: ``nn.Linear`` → :class:`TTLinear` (weight as a TT-matrix over ``d`` modes per side,
from TT-SVD); convolutions are not handled (use ``cp``, ``tucker`` or ``svd`` for them).

Rank rules (setting ``rank_rule``):

- ``"auto"`` (default): ``rank`` given → ``"fixed"``; ``eps`` given → ``"eps"``; else
  ``"budget"``;
- ``"budget"``: a ladder of TT-SVDs with the TT ranks capped at 1, 2, 3, 4, 6, 8, 12, … up to the
  exact ranks, for the global allocator;
- ``"fixed"``: every TT rank capped at ``rank``;
- ``"eps"``: δ-truncated TT-SVD with relative accuracy ``eps`` (‖W − Ŵ‖_F ≤ eps·‖W‖_F).

Each option's error is measured on the multiplied-out TT-matrix (exact, not a bound).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from tensorslim.decompose.tt import TTResult, first_unfolding_svd, full_tt_ranks, tt_svd
from tensorslim.errors import TensorslimError
from tensorslim.facts import Config, LayerStats
from tensorslim.layers.tt import TTLinear, padded_weight, tt_flops_per_row, tt_modes_for, tt_params
from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.planned import Factorizations

TT_RULES = ("auto", "budget", "fixed", "eps")


def rank_ladder(max_rank: int) -> list[int]:
    """Caps 1, 2, 3, 4, 6, 8, 12, 16, 24, … (×√2 steps, rounded) up to and including max_rank."""
    caps, value = [], 1.0
    while round(value) < max_rank:
        caps.append(round(value))
        value = max(value * math.sqrt(2), value + 1)
    caps.append(max_rank)
    return sorted(set(caps))


@dataclass
class TTMethod(Method):
    """Tensor-train decomposition of Linear layers (see the module docstring)."""

    name: ClassVar[str] = "tt"
    choice_noun: ClassVar[str] = "TT ranks"
    choice_hint: ClassVar[str] = "a per-layer rule (--set rank=8 or --set eps=0.3)"
    description: ClassVar[str] = "tensor-train Linear layers (TT-SVD), ranks by budget or accuracy"
    builds: ClassVar[tuple[type[nn.Module], ...]] = (TTLinear,)
    demo_settings: ClassVar[dict[str, Any] | None] = None
    rank_rule: str = "auto"
    rank: int | None = None
    eps: float | None = None
    d: int = 3
    # the planning instance's TT-SVDs, for its own build (see methods/planned.py)
    factorizations: Factorizations = field(
        default_factory=Factorizations, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.rank_rule not in TT_RULES:
            raise TensorslimError(
                f"tt: unknown rank_rule '{self.rank_rule}': use one of {', '.join(TT_RULES)}"
            )
        if self.rank is not None and (
            isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1
        ):
            raise TensorslimError(f"tt: rank must be a positive integer, got {self.rank}")
        if self.eps is not None and not 0 <= float(self.eps) < 1:
            raise TensorslimError(f"tt: eps must be in [0, 1), got {self.eps}")
        if isinstance(self.d, bool) or not isinstance(self.d, int) or not 2 <= self.d <= 8:
            raise TensorslimError(f"tt: d (modes per side) must be an integer in 2..8: {self.d}")
        if self.rank is not None and self.eps is not None:
            raise TensorslimError("tt: give rank or eps, not both")
        rule = self._rule()
        if rule == "fixed" and self.rank is None:
            raise TensorslimError("tt: rank_rule 'fixed' needs a rank (e.g. --set rank=8)")
        if rule == "eps" and self.eps is None:
            raise TensorslimError("tt: rank_rule 'eps' needs eps (e.g. --set eps=0.3)")

    def _rule(self) -> str:
        if self.rank_rule != "auto":
            return self.rank_rule
        if self.rank is not None:
            return "fixed"
        return "eps" if self.eps is not None else "budget"

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.Conv2d):
            return "tensor train is implemented for Linear layers only (use cp, tucker or svd)"
        return f"{type(module).__name__} is not a Linear layer"

    def modes(self, module: nn.Linear) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tt_modes_for(module.in_features, module.out_features, self.d)

    def decompose(
        self,
        module: nn.Linear,
        *,
        max_rank: int | None = None,
        eps: float | None = None,
        ranks: tuple[int, ...] | None = None,
    ) -> TTResult:
        """TT-SVD of the (padded) weight at one truncation."""
        out_modes, in_modes = self.modes(module)
        padded = padded_weight(module.weight.detach(), out_modes, in_modes)
        return tt_svd(padded, out_modes, in_modes, max_rank=max_rank, eps=eps, ranks=ranks)

    def ladder(self, module: nn.Linear) -> list[TTResult]:
        """TT-SVDs at every rank cap of :func:`rank_ladder`, sharing the first unfolding's SVD
        (the truncations differ only from the second bond on)."""
        out_modes, in_modes = self.modes(module)
        padded = padded_weight(module.weight.detach(), out_modes, in_modes)
        first = first_unfolding_svd(padded, out_modes, in_modes)
        top = max(full_tt_ranks(out_modes, in_modes))
        return [
            tt_svd(padded, out_modes, in_modes, max_rank=cap, first=first)
            for cap in rank_ladder(top)
        ]

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        assert isinstance(module, nn.Linear)
        rule = self._rule()
        out_modes, in_modes = self.modes(module)
        if rule == "fixed":
            results = [self.decompose(module, max_rank=self.rank)]
        elif rule == "eps":
            results = [self.decompose(module, eps=float(self.eps))]  # type: ignore[arg-type]
        else:
            results = self.ladder(module)
        self.factorizations.put(info.fqn, module.weight, {r.ranks: r for r in results})
        tokens = math.prod(info.input_shape[:-1]) * info.calls
        bias = module.out_features if module.bias is not None else 0
        options, seen = [], set()
        for result in results:
            if result.ranks in seen:
                continue
            seen.add(result.ranks)
            options.append(
                Option(
                    method=self.name,
                    config={
                        "out_modes": list(out_modes),
                        "in_modes": list(in_modes),
                        "ranks": list(result.ranks),
                    },
                    params=tt_params(out_modes, in_modes, result.ranks) + bias,
                    flops=tokens * tt_flops_per_row(out_modes, in_modes, result.ranks),
                    error=float(result.rel_error),
                    label=f"TT ranks {'-'.join(map(str, result.ranks[1:-1]))}",
                    extra={"modes": f"{out_modes}×{in_modes}"},
                )
            )
        return options

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TensorslimError(f"tt builds Linear layers only, got {type(module).__name__}")
        try:
            out_modes = tuple(int(v) for v in config["out_modes"])
            in_modes = tuple(int(v) for v in config["in_modes"])
            ranks = tuple(int(v) for v in config["ranks"])
        except (KeyError, TypeError, ValueError):
            raise TensorslimError(
                f"tt config needs out_modes, in_modes and ranks lists, got {config}"
            ) from None
        if not init:
            w = module.weight
            return TTLinear(
                module.in_features,
                module.out_features,
                out_modes,
                in_modes,
                ranks,
                module.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
        stored = self.factorizations.take(info.fqn if info else None, module.weight)
        result = stored.get(ranks) if stored is not None else None
        if result is None:
            weight = module.weight.detach()
            result = tt_svd(
                padded_weight(weight, out_modes, in_modes), out_modes, in_modes, ranks=ranks
            )
        if result.ranks != ranks:
            raise TensorslimError(
                f"tt: the weight supports TT ranks {result.ranks}, the config asks {ranks}"
            )
        return TTLinear.from_dense(module, result=result)


__all__ = ["TTMethod", "rank_ladder"]
