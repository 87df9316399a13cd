"""Unstructured pruning methods: ``rpg`` (Tian et al. 2023), ``gmp`` (Zhu & Gupta 2017) and
``rigl`` (Evci et al. 2020), reached during training.

``build`` puts a mask parametrization on the layer (all ones: pruning is gradual and happens in
training through :class:`tensorslim.train.pruning.PruningHook`), ``train_hooks`` returns that
hook with the target sparsity taken from the plan's budget (``params=0.1`` keeps 10 % of the
pruned layers' weights, i.e. 90 % sparsity), ``finalize`` bakes the masks into the weights and
``summary`` reports the sparsity reached and the δ-ranks.

Options offered per layer (one per sparsity s): ``params`` = nonzero weights (+ bias) =
⌊(1 − s)·n⌉, ``flops`` = the dense FLOPs (a masked weight is still computed densely),
``extra["nonzero_flops"]`` = dense FLOPs × density, ``error`` = ‖W − P_s(W)‖_F / ‖W‖_F for the
one-shot magnitude pruning P_s of that layer alone.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tensorslim.analysis.delta_rank import DEFAULT_DELTA
from tensorslim.errors import TensorslimError
from tensorslim.facts import Config, LayerStats
from tensorslim.layers.linear_like import as_conv1d
from tensorslim.layers.sparse import PRUNABLE_TYPES, add_mask, finalize, mask_of, masked_modules
from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.presets import Preset
from tensorslim.surgery import replace_module
from tensorslim.train.hooks import TrainHook, unwrap
from tensorslim.train.pruning import (
    SCHEDULE_KINDS,
    SCOPES,
    PruningHook,
    check_sparsity,
    pruning_summary,
)

if TYPE_CHECKING:
    from tensorslim.plan import CompressionPlan
    from tensorslim.rank.budget import Budget

CANDIDATE_SPARSITIES = (0.5, 0.75, 0.8, 0.9, 0.95, 0.98, 0.99)


def magnitude_pruning_errors(weight: torch.Tensor, sparsities: list[float]) -> list[float]:
    """Relative Frobenius error of keeping the ⌊(1 − s)·n⌉ largest |w| of ``weight``, per s."""
    squares = weight.detach().double().reshape(-1) ** 2
    total = float(squares.sum())
    ordered = torch.sort(squares).values
    prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])
    n = squares.numel()
    errors = []
    for s in sparsities:
        dropped = round(s * n)
        errors.append(math.sqrt(float(prefix[dropped]) / total) if total > 0 else 0.0)
    return errors


def target_from_plan(plan: CompressionPlan | Any, default: float) -> float:
    """Target sparsity of the pruned layers from the plan's budget.

    ``params=f`` → 1 − f. No budget → ``default`` (the method's ``sparsity`` setting). A FLOPs
    budget ``flops=f`` is read the same way, with a warning: masks do not remove dense FLOPs
    (the kernels compute every zero); only the nonzero FLOPs fall, roughly in proportion.
    """
    return target_from_budget(getattr(plan, "budget", None), default)


def target_from_budget(budget: Budget | dict | None, default: float) -> float:
    """Target sparsity for ``budget`` (``params=f`` → 1 − f); ``None`` → ``default``."""
    if budget is None:
        return default
    if not isinstance(budget, dict):
        budget = budget.to_dict() if hasattr(budget, "to_dict") else dict(budget)
    if budget.get("params") is not None:
        fraction = float(budget["params"])
    elif budget.get("flops") is not None:
        fraction = float(budget["flops"])
        warnings.warn(
            f"pruning reads the budget flops={fraction:g} as keeping {fraction:.0%} of the pruned "
            "layers' weights: masked layers still run dense kernels, so counted FLOPs do not "
            "drop (nonzero FLOPs fall roughly in proportion); prefer --budget params=…",
            stacklevel=2,
        )
    else:
        raise TensorslimError(f"unknown budget {budget}: use params=FRACTION")
    if not 0.0 < fraction <= 1.0:
        raise TensorslimError(f"budget fraction must be in (0, 1], got {fraction}")
    return check_sparsity(1.0 - fraction, "target sparsity (1 − budget fraction)")


@dataclass
class _PruningMethod(Method):
    """Shared settings and behaviour of gmp, rigl and rpg (differing only in their defaults).

    Settings: ``sparsity`` (target when the plan has no budget), ``schedule`` (cubic,
    exponential, constant), ``start``/``end`` (fractions of training), ``interval`` (ΔT in steps;
    None = about 25 updates), ``initial_sparsity``, ``drop_fraction`` (RigL α), ``rank_weight``
    (λ of the adversarial rank loss), ``partial_k`` (its tail-energy fraction),
    ``rank_loss_every_step``, ``rank_loss_layers`` ("conv": every convolution, as in RPG's code;
    "pruned": the ranked layers), ``scope`` (the layer sparsity distribution: "global" ranking,
    "layer"/"uniform" or "erk"), ``keep_first_dense``, ``keep_last_dense``, ``delta`` (δ of the
    δ-rank reports).
    """

    kind: ClassVar[str] = "training"
    budget_metric: ClassVar[str] = "params"
    sparsity: float = 0.9
    schedule: str = "cubic"
    start: float = 0.0
    # Gradual pruning reaches the target at 25 % of the steps and keeps the other 75 % to
    # recover. Fine-tuning a trained small_cnn on Fashion-MNIST for 200 steps (4 seeds, 95 / 98 %
    # sparsity), ending at 75 % of the steps cost GMP 0.55 / 1.10 accuracy points and RPG 0.43 /
    # 1.15 against ending at 25 % (bench/results/pruning_seeds.md).
    end: float = 0.25
    interval: int | None = None
    initial_sparsity: float = 0.0
    drop_fraction: float = 0.0
    rank_weight: float = 0.0
    partial_k: float = 0.1
    rank_loss_every_step: bool = False
    rank_loss_layers: str = "conv"
    scope: str = "global"
    keep_first_dense: bool = True
    keep_last_dense: bool = False
    delta: float = DEFAULT_DELTA
    _pruned_layers: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity, f"{self.name} sparsity")
        if self.schedule not in SCHEDULE_KINDS:
            raise TensorslimError(
                f"unknown schedule '{self.schedule}': use {', '.join(SCHEDULE_KINDS)}"
            )
        if self.scope not in SCOPES:
            raise TensorslimError(f"unknown scope '{self.scope}': use {', '.join(SCOPES)}")
        # The hook validates the rest (interval, fractions, λ, partial_k, δ) with clear errors.
        self._hook(self.sparsity)

    def settings(self) -> dict[str, Any]:
        settings = super().settings()
        settings.pop("_pruned_layers", None)
        return settings

    def _hook(self, target: float) -> PruningHook:
        return PruningHook(
            target,
            schedule=self.schedule,
            start=self.start,
            end=self.end,
            interval=self.interval,
            initial_sparsity=self.initial_sparsity,
            drop_fraction=self.drop_fraction,
            rank_weight=self.rank_weight,
            partial_k=self.partial_k,
            rank_loss_every_step=self.rank_loss_every_step,
            rank_loss_layers=self.rank_loss_layers,
            scope=self.scope,
            keep_first_dense=self.keep_first_dense,
            keep_last_dense=self.keep_last_dense,
            delta=self.delta,
        )

    # ----- per layer ---------------------------------------------------------------------------
    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if not isinstance(module, PRUNABLE_TYPES):
            return f"{type(module).__name__} is not a Linear or Conv2d"
        if mask_of(module) is not None:
            return "already has a pruning mask"
        return None

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        weight = module.weight.detach()
        n = weight.numel()
        bias = module.bias.numel() if getattr(module, "bias", None) is not None else 0
        sparsities = sorted({*CANDIDATE_SPARSITIES, self.sparsity})
        if not bool(weight.any()):
            warnings.warn(
                f"{info.fqn}: all weights are zero; pruning it removes nothing", stacklevel=2
            )
        errors = magnitude_pruning_errors(weight, sparsities)
        options = []
        for s, error in zip(sparsities, errors, strict=True):
            keep = n - round(s * n)
            options.append(
                Option(
                    method=self.name,
                    config={"sparsity": s},
                    params=keep + bias,
                    flops=info.flops,
                    error=error,
                    label=f"{s:.0%} sparse",
                    extra={
                        "sparsity": s,
                        "nonzero_flops": round(info.flops * keep / n),
                        "nonzero_weights": keep,
                    },
                )
            )
        return options

    def with_budget(self, budget: Budget) -> _PruningMethod:
        """The same method with ``sparsity`` = the budget's target (``params=f`` → 1 − f)."""
        return dataclasses.replace(self, sparsity=target_from_budget(budget, self.sparsity))

    def choose_without_budget(self, options: list[Option], info: LayerInfo) -> Option | None:
        """The option at the ``sparsity`` setting (the hook's global ranking decides in the end)."""
        for option in options:
            if math.isclose(option.config["sparsity"], self.sparsity):
                return option
        raise TensorslimError(f"{info.fqn}: no option at sparsity {self.sparsity}")

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        """A copy of ``module`` with an all-ones mask on its weight.

        The mask starts dense for both ``init`` values: the sparsity in ``config`` is reached
        gradually by the training hook, and ``load`` overwrites the mask with the saved one.
        """
        name = info.fqn if info is not None else "layer"
        reason = self.supports(module, name)
        if reason is not None:
            raise TensorslimError(f"{self.name} cannot prune {name}: {reason}")
        check_sparsity(float(config.get("sparsity", self.sparsity)), f"{name} sparsity")
        new = copy.deepcopy(module)
        add_mask(new, name=name)
        return new

    # ----- training ----------------------------------------------------------------------------
    def train_hooks(self, model: nn.Module, plan: CompressionPlan) -> list[TrainHook]:
        target = target_from_plan(plan, self.sparsity)
        if not any(True for _ in masked_modules(unwrap(model))):
            raise TensorslimError(
                f"{self.name}: the model has no masked layer; apply the plan first"
            )
        hook = self._hook(target)
        hook.resolve_layers(model)
        self._pruned_layers = hook.layer_names
        return [hook]

    def finalize(self, model: nn.Module, plan: CompressionPlan) -> nn.Module:
        if self._pruned_layers is None:
            self._pruned_layers = [n for n, _ in masked_modules(unwrap(model))]
        finalize(model)
        # a transformers Conv1D was pruned as the Linear it computes: baked, it becomes a Conv1D
        # again, so the model's layer types and state-dict layout are the original model's
        net = unwrap(model)
        for lp in plan.layers:
            if lp.method == self.name and lp.type_name == "Conv1D":
                layer = net.get_submodule(lp.fqn)
                if isinstance(layer, nn.Linear):
                    replace_module(net, lp.fqn, as_conv1d(layer))
        return model

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """Sparsity reached, per-layer sparsity, δ-ranks and the RPG code's energy ranks at
        ``partial_k`` (see ``pruning_summary``)."""
        layers = self._pruned_layers
        named = dict(unwrap(model).named_modules())
        if layers is not None:
            layers = [n for n in layers if n in named]
        return pruning_summary(model, self.delta, layers or None, self.partial_k)


# The official RPG runs (huawei-noah/Efficient-Computing, Pruning/RPG/train.sh, ResNet-50 on
# ImageNet): --distribution magnitude-exponential (density D^(j/U) at the j-th of U updates, one
# global magnitude ranking over every conv and linear weight, the first conv included),
# --delta 100 (an update every 100 steps), --iterative_T_end_percent 0.9 (the density reaches D at
# 90 % of training), --alpha 0.3; λ (--lamb) and partial_k vary with the sparsity (0.5 / 0.2 at
# 80 %, 0.5 / 0.1 at 90 %, 3 / 0.2 at 95 %, 4 / 0.2 at 98 %): λ stays this library's.
RPG_PAPER = Preset(
    settings={
        "schedule": "exponential",
        "interval": 100,
        "start": 0.0,
        "end": 0.9,
        "scope": "global",
        "keep_first_dense": False,
        "keep_last_dense": False,
        "drop_fraction": 0.3,
    },
    description="the official code's schedule: exponential density, ΔT = 100, until 90 %, "
    "global ranking over all conv and linear layers",
    source="huawei-noah/Efficient-Computing Pruning/RPG (train.sh, rigl_torch/RigL.py)",
)


@dataclass
class RPGMethod(_PruningMethod):
    """RPG: gradual global magnitude pruning + RigL regrowth scored by task + λ·adversarial rank
    loss (Tian et al., NeurIPS 2023)."""

    name: ClassVar[str] = "rpg"
    description: ClassVar[str] = "rank-preserving sparse pruning (gradual + regrow + rank loss)"
    demo_settings: ClassVar[dict[str, Any] | None] = {"sparsity": 0.8}
    drop_fraction: float = 0.3
    # λ: on small_cnn / Fashion-MNIST at 98 % sparsity, λ = 1 / 10 / 30 raised the average
    # δ-rank over GMP's 57.2 to 58.5 / 61.0 / 65.0 at accuracy 0.871 / 0.872 / 0.864 (GMP 0.871);
    # 10 keeps the accuracy (bench/pruning.py, pilot runs).
    rank_weight: float = 10.0
    presets: ClassVar[dict[str, Preset]] = {"paper": RPG_PAPER}


@dataclass
class GMPMethod(_PruningMethod):
    """GMP: gradual global magnitude pruning on the cubic schedule (Zhu & Gupta 2017)."""

    name: ClassVar[str] = "gmp"
    description: ClassVar[str] = "gradual magnitude pruning (cubic schedule, global ranking)"
    demo_settings: ClassVar[dict[str, Any] | None] = None


@dataclass
class RigLMethod(_PruningMethod):
    """RigL from a trained model: one-shot global magnitude pruning to the target, then
    prune-and-regrow by dense-gradient magnitude at constant sparsity (Evci et al. 2020)."""

    name: ClassVar[str] = "rigl"
    description: ClassVar[str] = "RigL: one-shot magnitude pruning, then drop/regrow by gradient"
    demo_settings: ClassVar[dict[str, Any] | None] = None
    schedule: str = "constant"
    drop_fraction: float = 0.3
    # drop/regrow ends at 75 % of training (RigL's T_end); its sparsity is final from step 0
    end: float = 0.75
