"""Post-hoc low-rank SVD of trained Linear, Conv1d and Conv2d layers (the foundation method)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch
from torch import nn

from tensorslim.analysis.output_error import (
    errors_from_energies,
    relative_output_error,
    weight_rows_matrix,
)
from tensorslim.decompose.svd import (
    GramFactorization,
    conv_weight_to_matrix,
    gram_factorization,
    matrix_to_conv_weight,
    singular_values,
)
from tensorslim.errors import TensorslimError
from tensorslim.facts import OUTPUT_ERROR, Config, LayerStats
from tensorslim.layers.attention import LowRankMultiheadAttention
from tensorslim.layers.composite import (
    composite_matrices,
    is_composite,
    unsupported_composite_reason,
)
from tensorslim.layers.conv_geometry import geometry_of, unsupported_conv_reason
from tensorslim.layers.lowrank import LowRankConv2d, LowRankLinear
from tensorslim.layers.lowrank_conv1d import LowRankConv1d
from tensorslim.layers.recurrent import LowRankRNN
from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.planned import Factorizations
from tensorslim.methods.svd_composite import build_composite, composite_candidates
from tensorslim.rank.alignment import alignment_for
from tensorslim.rank.select import (
    energy_kept,
    rank_from_energy,
    rank_from_ratio,
    validate_fixed_rank,
)

SCHEMES = ("channel", "spatial", "best")
MAX_LADDER = 48  # options per layer offered to the allocator (ranks spaced over 1..R)


@dataclass
class SVDMethod(Method):
    """Truncated SVD: Linear → two Linears, Conv1d → two Conv1ds (channel-wise), Conv2d → two
    convs (channel- or spatial-wise).

    Settings: ``scheme`` ("channel", "spatial", or "best": offer both and let the allocator
    choose); one optional per-layer rule — ``rank`` (fixed), ``ratio`` (of the full rank) or
    ``energy`` (fraction of Σσ² to keep); ``driver`` for the SVD ("auto", "full",
    "randomized"). With a global budget the rule is ignored and ranks come from the allocator.

    With ``driver="auto"`` one factorization per layer and scheme (the eigendecomposition of the
    smaller Gram matrix, float32 for large layers: :class:`~tensorslim.decompose.svd.
    GramFactorization`) gives every rank's error, the output-space errors and the factors
    ``build`` uses; the planning instance keeps it, so ``apply`` does not factorize again.
    """

    name: ClassVar[str] = "svd"
    description: ClassVar[str] = (
        "low-rank SVD (channel-/spatial-wise for convs; attention and LSTM/GRU matrices too)"
    )
    builds: ClassVar[tuple[type[nn.Module], ...]] = (
        LowRankLinear,
        LowRankConv2d,
        LowRankConv1d,
        LowRankRNN,
        LowRankMultiheadAttention,
    )
    scheme: str = "channel"
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    driver: str = "auto"
    # the planning instance's factorizations, for its own build (see methods/planned.py)
    factorizations: Factorizations = field(
        default_factory=Factorizations, init=False, repr=False, compare=False
    )
    # the planning instance's rank-1 FLOPs per (layer, scheme, input shape): layers alike (55
    # convs, 9 kinds in resnet56) build the pricing skeleton once
    unit_flops: dict[tuple[str, str, tuple[int, ...]], int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise TensorslimError(f"unknown SVD scheme '{self.scheme}': use {', '.join(SCHEMES)}")
        rules = [k for k in ("rank", "ratio", "energy") if getattr(self, k) is not None]
        if len(rules) > 1:
            raise TensorslimError(f"give at most one of rank, ratio, energy (got {rules})")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise TensorslimError(f"ratio must be in (0, 1], got {self.ratio}")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise TensorslimError(f"energy to keep must be in (0, 1], got {self.energy}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise TensorslimError(f"rank must be a positive integer, got {self.rank}")

    @property
    def has_rule(self) -> bool:
        return any(getattr(self, k) is not None for k in ("rank", "ratio", "energy"))

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            return unsupported_conv_reason(module)
        if is_composite(module):
            return unsupported_composite_reason(module)
        return (
            f"{type(module).__name__} is not a layer svd factorizes "
            "(Linear, Conv1d, Conv2d, RNN/LSTM/GRU, MultiheadAttention)"
        )

    def _schemes(self, module: nn.Module) -> tuple[str, ...]:
        # a 1-D kernel has no second spatial axis to split: only the channel scheme exists
        if not isinstance(module, nn.Conv2d) or tuple(module.kernel_size) == (1, 1):
            return ("channel",)
        return ("channel", "spatial") if self.scheme == "best" else (self.scheme,)

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        if is_composite(module):
            return composite_candidates(self, module, info, _ladder(_largest_full_rank(module)))
        options: list[Option] = []
        factorizations = {s: _factorize(module, s) for s in self._schemes(module)}
        self.factorizations.put(info.fqn, module.weight, factorizations)
        for scheme, factorization in factorizations.items():
            spectrum = factorization.singular_values
            full = spectrum.numel()
            kept = energy_kept(spectrum).tolist()  # floats: ~5000 options read it on resnet56
            ranks = [self._rule_rank(spectrum, info.fqn)] if self.has_rule else _ladder(full)
            # a factorized layer's FLOPs and params are linear in its rank (plus the bias): one
            # rank-1 skeleton prices all
            unit_flops = self._unit_flops(module, scheme, tuple(info.input_shape))
            bias = _params(module, 0, scheme)
            unit_params = _params(module, 1, scheme) - bias
            suffix = "" if scheme == "channel" else " spatial"
            for rank in ranks:
                options.append(
                    Option(
                        method=self.name,
                        config={"rank": rank, "scheme": scheme},
                        params=unit_params * rank + bias,
                        flops=unit_flops * rank * info.calls,
                        error=math.sqrt(max(0.0, 1.0 - kept[rank - 1])),
                        label=f"rank {rank}/{full}{suffix}",
                        extra={"energy_kept": kept[rank - 1], "full_rank": full},
                    )
                )
        return options

    def _unit_flops(self, module: nn.Module, scheme: str, shape: tuple[int, ...]) -> int:
        """FLOPs of ``module``'s rank-1 factorization in ``scheme`` at input ``shape``."""
        key = (f"{type(module).__qualname__}|{module!r}", scheme, shape)
        if key not in self.unit_flops:
            skeleton = self._skeleton(module, 1, scheme, meta=True)
            self.unit_flops[key] = skeleton.analytic_flops(shape)
        return self.unit_flops[key]

    def output_errors(
        self, module: nn.Module, info: LayerInfo, options: list[Option], stats: LayerStats
    ) -> list[Option]:
        """Output-space errors from one SVD per scheme (:mod:`tensorslim.analysis.output_error`).

        Channel scheme (and Linear): the error of every rank from σ_i² v_iᵀ G v_i. Spatial
        scheme: its rank-r kernel differs from the channel view's truncation, so each offered
        rank is multiplied out once and measured against the Gram.
        """
        assert stats.gram is not None
        if is_composite(module):
            return super().output_errors(module, info, options, stats)
        errors: dict[tuple[str, int], float] = {}
        for scheme in {o.config["scheme"] for o in options}:
            ranks = sorted({o.config["rank"] for o in options if o.config["scheme"] == scheme})
            factorization = self._factorization(module, scheme, info)
            errors.update(_scheme_output_errors(module, scheme, ranks, stats.gram, factorization))
        return [
            dataclasses.replace(
                o,
                error=errors[(o.config["scheme"], o.config["rank"])],
                error_space=OUTPUT_ERROR,
            )
            for o in options
        ]

    def _rule_rank(self, spectrum: torch.Tensor, fqn: str) -> int:
        full = spectrum.numel()
        if self.rank is not None:
            return validate_fixed_rank(self.rank, full, fqn)
        if self.ratio is not None:
            return rank_from_ratio(self.ratio, full)
        return rank_from_energy(spectrum, float(self.energy))  # type: ignore[arg-type]

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        if is_composite(module):
            return build_composite(module, config, init=init, driver=self.driver)  # type: ignore[arg-type]
        rank, scheme = config.get("rank"), str(config.get("scheme", "channel"))
        # an edited plan may hold anything here: int() would turn 2.5 into 2 without a word
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TensorslimError(f"rank {rank!r} in the plan is not a positive integer")
        if not init:
            return self._skeleton(module, rank, scheme)
        factors = None
        if self.driver == "auto":
            # the plan's factorization at the chosen rank (the same one a fresh instance makes)
            factorization = self._factorization(module, scheme, info, take=True)
            factors = factorization.balanced(_scheme_matrix(module, scheme), rank)
        if isinstance(module, nn.Linear):
            if factors is not None:
                return LowRankLinear.from_factors(module, *factors)
            return LowRankLinear.from_dense(module, rank, driver=self.driver)  # type: ignore[arg-type]
        if isinstance(module, nn.Conv1d):
            return LowRankConv1d.from_dense(module, rank, driver=self.driver, factors=factors)  # type: ignore[arg-type]
        return LowRankConv2d.from_dense(module, rank, scheme, driver=self.driver, factors=factors)  # type: ignore[arg-type]

    def _factorization(
        self, module: nn.Module, scheme: str, info: LayerInfo | None, take: bool = False
    ) -> GramFactorization:
        """The scheme matrix's factorization: from the planning store, else computed now."""
        fqn = info.fqn if info is not None else None
        store = self.factorizations
        stored = store.take(fqn, module.weight) if take else store.get(fqn, module.weight)
        if stored is not None and scheme in stored:
            return stored[scheme]
        return _factorize(module, scheme)

    @staticmethod
    def _skeleton(module: nn.Module, rank: int, scheme: str, meta: bool = False) -> nn.Module:
        # meta=True builds on the meta device: no memory, used only for FLOP formulas
        placed = {**geometry_of(module), **({"device": torch.device("meta")} if meta else {})}
        if isinstance(module, nn.Linear):
            return LowRankLinear(rank=rank, **placed)
        if isinstance(module, nn.Conv1d):
            return LowRankConv1d(rank=rank, **placed)
        return LowRankConv2d(rank=rank, scheme=scheme, **placed)  # type: ignore[arg-type]


def _scheme_output_errors(
    module: nn.Module,
    scheme: str,
    ranks: list[int],
    gram: torch.Tensor,
    factorization: GramFactorization,
) -> dict[tuple[str, int], float]:
    """(scheme, rank) → ‖(W − Ŵ_r)X‖ / ‖WX‖ for the truncated SVD of the scheme's matrix."""
    matrix = weight_rows_matrix(module)
    if not isinstance(module, nn.Conv2d) or scheme == "channel":
        table = errors_from_energies(factorization.output_energies(matrix, gram))
        return {(scheme, r): float(table[r]) for r in ranks}
    kernel = module.weight.detach().double()
    spatial = conv_weight_to_matrix(kernel, "spatial")
    result = {}
    for r in ranks:
        a, b = factorization.balanced(spatial, r)
        approx = matrix_to_conv_weight(a @ b.T, kernel.shape, "spatial")
        result[(scheme, r)] = relative_output_error(matrix, approx, gram)
    return result


def _params(module: nn.Module, rank: int, scheme: str) -> int:
    bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
    if isinstance(module, nn.Linear):
        return rank * (module.in_features + module.out_features) + bias
    if isinstance(module, nn.Conv1d):
        n, c, k = module.weight.shape
        return rank * (c * k + n) + bias
    n, c, kh, kw = module.weight.shape
    if scheme == "channel":
        return rank * (c * kh * kw + n) + bias
    return rank * (c * kh + n * kw) + bias


def _scheme_matrix(module: nn.Module, scheme: str) -> torch.Tensor:
    weight = module.weight.detach()
    if weight.dim() <= 3:  # Linear (out × in), Conv1d (n, c, k) → n × c·k
        return weight.reshape(weight.shape[0], -1)
    return conv_weight_to_matrix(weight, scheme)  # type: ignore[arg-type]


def _factorize(module: nn.Module, scheme: str) -> GramFactorization:
    """One factorization of the scheme matrix: every rank's spectrum, error and factors."""
    return gram_factorization(_scheme_matrix(module, scheme))


def _spectrum(module: nn.Module, scheme: str) -> torch.Tensor:
    return singular_values(_scheme_matrix(module, scheme))


def _largest_full_rank(module: nn.Module) -> int:
    return max(min(w.shape) for w in composite_matrices(module))


@lru_cache(maxsize=256)
def _ladder(full_rank: int) -> list[int]:
    """Ranks offered to the allocator: 1..R when R is small, else a grid denser at low ranks.

    Each grid rank is rounded to a multiple of the largest of 16, 8, 4, 2 that fits in its
    step (:mod:`tensorslim.rank.alignment`: CPU kernels work on blocks of 8 or 16 channels)."""
    if full_rank <= MAX_LADDER:
        return list(range(1, full_rank + 1))
    grid = torch.linspace(0, 1, MAX_LADDER, dtype=torch.float64) ** 1.5 * (full_rank - 1) + 1
    values = [float(v) for v in grid]
    ranks = {1, full_rank}
    for previous, value in itertools.pairwise(values):
        step = value - previous
        multiple = alignment_for(step)
        ranks.add(min(full_rank, max(1, multiple * round(value / multiple))))
    return sorted(ranks)


def layer_spectrum(module: nn.Module, scheme: str = "channel") -> torch.Tensor:
    """Singular values of a Linear weight or a conv kernel's ``scheme`` matrix (descending)."""
    return _spectrum(module, scheme)
