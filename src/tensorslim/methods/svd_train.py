"""Method ``svd_train``: SVD training (Yang et al., CVPR-W 2020) as a registered method.

Planning gives every supported layer one option, its full-rank SVD form (``SVDLinear`` /
``SVDConv2d``; costlier than dense while training — the saving comes at the end). Training adds
the orthogonality and sparsity regularizers (``train_hooks``). ``finalize`` prunes singular
values by energy — with the plan's budget, the energy threshold is searched so the whole model
meets it — merges layers whose rank left does not pay back to dense, and converts the rest to
``LowRankLinear``/``LowRankConv2d``. The pipeline that fine-tunes in SVD form between pruning
and conversion composes these stages (``prune``, ``orthogonality_hooks``):
``tensorslim.train.svd_pipeline.svd_train_pipeline`` (CLI: ``tensorslim svd-train``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.facts import Config, LayerStats
from tensorslim.inputs import zeros_from
from tensorslim.layers.conv_geometry import geometry_of, unsupported_conv_reason
from tensorslim.layers.svd import SVDConv2d, SVDLayer, SVDLinear
from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.presets import Preset

if TYPE_CHECKING:
    from tensorslim.plan import CompressionPlan
    from tensorslim.train.hooks import TrainHook


def _zeros_input(model: nn.Module, plan: CompressionPlan) -> Any:
    """A zero input of the plan's example on the model's device (for shapes and costs only):
    rebuilt from the plan's input description — token ids stay integers, keyword inputs stay
    keywords — else a zero batch of its first tensor's shape in the model's dtype."""
    first = next(iter(model.parameters()))
    if plan.input_spec is not None:
        return zeros_from(plan.input_spec, first.device)
    return torch.zeros(plan.input_shape, device=first.device, dtype=first.dtype)


# The official code (yanghr/SVD_Prune_EDLCV, CNN/cifar10/cifar10_resnet20.py and its "Start up
# code.md"): Adam at lr 1e-3 with no weight decay (its --decay is λs, not a weight decay), the
# learning rate ×0.1 at epochs 81 and 122 of 164, --perp_weight (λo) 1.0 in every stage, no
# BatchNorm re-estimation; and three runs: from scratch in SVD form with the orthogonality loss
# only (--reg_type None --decay 0), then with the sparsity term, prune, fine-tune with λo only.
# λs (--decay) and the pruning energy (-e) vary with the network and the scheme: they stay the
# caller's. The first run is the pipeline's orthogonality stage (epochs_orthogonal, CLI
# --orthogonal-epochs); compress trains in one phase and reads lr, optimizer, weight_decay only.
SVD_TRAIN_PAPER = Preset(
    settings={"lambda_o": 1.0, "budget_gate_energy": None},
    training={
        "optimizer": "adam",
        "lr": 1e-3,
        "finetune_lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "step",
        "bn_recalibration_batches": 0,
    },
    description="the official code's training: Adam 1e-3 without weight decay, ×0.1 at 81/164 "
    "and 122/164, λo = 1, no BatchNorm re-estimation (first stage: --orthogonal-epochs)",
    source="yanghr/SVD_Prune_EDLCV (CNN/cifar10/cifar10_resnet20.py, Start up code.md)",
)


@dataclass
class SVDTrainMethod(Method):
    """Settings: ``scheme`` ("channel" | "spatial" for convs), ``reg`` ("l1" | "hoyer" |
    "hoyer_square"), ``lambda_o`` and ``lambda_s`` (≥ 0), ``energy`` (fraction of Σs² pruning may
    remove per layer, in [0, 1); used when the plan has no budget), ``from_scratch`` (ignore the
    dense weights, Kaiming-style init), ``merge_dense`` (merge layers whose rank does not pay),
    ``linear`` (also train Linear layers in SVD form; off by default, as in the paper, which
    decomposes convolutions only — exclude the classifier if you turn it on),
    ``budget_gate_energy`` (with a budget: leave the sparsity term out of the loss while pruning
    that energy would already meet the budget; None = always on, as in the paper)."""

    name: ClassVar[str] = "svd_train"
    description: ClassVar[str] = (
        "SVD training: orthogonality + singular value sparsity, then energy pruning (Yang 2020)"
    )
    builds: ClassVar[tuple[type[nn.Module], ...]] = (
        SVDLinear,
        SVDConv2d,
    )
    kind: ClassVar[str] = "training"
    post_finalize_epochs: ClassVar[int] = 1
    demo_settings: ClassVar[dict[str, Any] | None] = {
        "scheme": "channel",
        "reg": "hoyer",
        "lambda_o": 1.0,
        "lambda_s": 0.02,
    }

    presets: ClassVar[dict[str, Preset]] = {"paper": SVD_TRAIN_PAPER}

    scheme: str = "channel"
    reg: str = "hoyer"
    lambda_o: float = 1.0
    lambda_s: float = 0.01
    energy: float | None = None
    from_scratch: bool = False
    merge_dense: bool = True
    linear: bool = False
    budget_gate_energy: float | None = None

    def __post_init__(self) -> None:
        from tensorslim.rank.energy_prune import check_energy
        from tensorslim.train.svd_regularizers import check_lambda, sparsity_function

        if self.scheme not in ("channel", "spatial"):
            raise TensorslimError(f"unknown SVD scheme '{self.scheme}': use 'channel' or 'spatial'")
        sparsity_function(self.reg)
        self.lambda_o = check_lambda(self.lambda_o, "lambda_o")
        self.lambda_s = check_lambda(self.lambda_s, "lambda_s")
        if self.energy is not None:
            self.energy = check_energy(self.energy)
        if self.budget_gate_energy is not None:
            self.budget_gate_energy = check_energy(self.budget_gate_energy)
        self._last_report: dict[str, Any] | None = None

    def supports(self, module: nn.Module, fqn: str) -> str | None:
        if isinstance(module, nn.Linear):
            if self.linear:
                return None
            # the authors decompose convolutions only; energy pruning of a small classifier can
            # leave it at rank 1, which no fine-tuning repairs
            return "Linear layers stay dense unless linear=True (the paper decomposes convs only)"
        if isinstance(module, nn.Conv2d):
            return unsupported_conv_reason(module)
        return f"{type(module).__name__} is not a Linear or Conv2d"

    def _scheme_for(self, module: nn.Module) -> str:
        # a 1×1 kernel has one matrix view: call it channel-wise
        if isinstance(module, nn.Linear) or tuple(module.kernel_size) == (1, 1):
            return "channel"
        return self.scheme

    def _skeleton(
        self,
        module: nn.Module,
        rank: int | None,
        scheme: str,
        *,
        init: bool,
        device: torch.device | None = None,
    ) -> SVDLayer:
        placed = {**geometry_of(module), **({"device": device} if device is not None else {})}
        if isinstance(module, nn.Linear):
            return SVDLinear(rank=rank, init=init, **placed)
        return SVDConv2d(scheme=scheme, rank=rank, init=init, **placed)  # type: ignore[arg-type]

    def candidates(
        self, module: nn.Module, info: LayerInfo, stats: LayerStats | None = None
    ) -> list[Option]:
        scheme = self._scheme_for(module)
        # on the meta device: shapes and formulas only, no memory and no SVD
        layer = self._skeleton(module, None, scheme, init=False, device=torch.device("meta"))
        full = layer.full_rank
        m, n = layer.matrix_shape
        bias = module.bias.numel() if module.bias is not None else 0
        return [
            Option(
                method=self.name,
                config={"rank": full, "scheme": scheme},
                params=full * (m + n + 1) + bias,
                flops=layer.flops_at_rank(info.input_shape, full) * info.calls,
                error=0.0,
                label=f"SVD form, full rank {full}" + ("" if scheme == "channel" else " spatial"),
                extra={"full_rank": full},
            )
        ]

    def build(
        self, module: nn.Module, config: Config, info: LayerInfo | None, *, init: bool = True
    ) -> nn.Module:
        rank = config.get("rank")
        scheme = str(config.get("scheme", self._scheme_for(module)))
        if rank is not None:
            rank = int(rank)
        if not init:
            return self._skeleton(module, rank, scheme, init=False)
        if self.from_scratch:
            return self._skeleton(module, rank, scheme, init=True)
        if isinstance(module, nn.Linear):
            return SVDLinear.from_dense(module, rank)
        return SVDConv2d.from_dense(module, scheme, rank)  # type: ignore[arg-type]

    def _target(self, plan: CompressionPlan) -> tuple[str, float] | None:
        budget = plan.budget
        return (budget.metric, budget.fraction) if budget is not None else None

    def train_hooks(self, model: nn.Module, plan: CompressionPlan) -> list[TrainHook]:
        from tensorslim.train.svd_regularizers import SVDRegularizerHook

        if self._target(plan) is None and self.energy is None:
            raise TensorslimError(
                "svd_train needs a budget (e.g. --budget flops=0.5) or an energy threshold "
                "(e.g. --set energy=0.05) to prune singular values after training"
            )
        gate = None
        target = self._target(plan)
        if self.budget_gate_energy is not None and target is not None:
            from tensorslim.train.hooks import unwrap
            from tensorslim.train.svd_prune import BudgetGate

            net = unwrap(model)
            metric, fraction = target
            reference = plan.model_flops if metric == "flops" else plan.model_params
            gate = BudgetGate(
                net,
                _zeros_input(net, plan),
                metric,
                fraction,
                reference,
                energy=self.budget_gate_energy,
                merge_dense=self.merge_dense,
            )
        return [SVDRegularizerHook(self.lambda_o, self.lambda_s, self.reg, sparsity_gate=gate)]

    def prune(self, model: nn.Module, plan: CompressionPlan) -> dict[str, Any]:
        """Energy pruning (the threshold searched for the plan's budget when it has one, else
        ``energy``) and the merge of layers whose rank left does not pay; survivors stay in SVD
        form. Returns the pruning report (``tensorslim.train.svd_prune.prune_svd_model``)."""
        from tensorslim.train.svd_prune import prune_and_merge

        target = self._target(plan)
        if target is None and self.energy is None:
            raise TensorslimError(
                "svd_train needs a budget or energy=… to prune singular values (see train_hooks)"
            )
        self._last_report = prune_and_merge(
            model,
            _zeros_input(model, plan),
            energy=None if target is not None else self.energy,
            target=target,
            reference=(plan.model_flops, plan.model_params),
            merge_dense=self.merge_dense,
        )
        return self._last_report

    def finalize(self, model: nn.Module, plan: CompressionPlan) -> nn.Module:
        """:meth:`prune`, then every surviving SVD layer becomes its ``LowRank*`` layer."""
        from tensorslim.train.svd_prune import svd_to_lowrank

        self.prune(model, plan)
        svd_to_lowrank(model)
        return model

    def orthogonality_hooks(self, model: nn.Module, *, keep: bool = True) -> list[TrainHook]:
        """The regularizer of training in SVD form without sparsity: λo·Σ L_o (0 without
        ``keep``), no sparsity term — the authors' first run and their fine-tuning both run
        with ``--reg_type None`` and the same orthogonality weight. None without SVD layers."""
        from tensorslim.layers.svd import svd_layers
        from tensorslim.train.hooks import unwrap
        from tensorslim.train.svd_regularizers import SVDRegularizerHook

        if not svd_layers(unwrap(model)):
            return []
        return [SVDRegularizerHook(self.lambda_o if keep else 0.0, 0.0, self.reg)]

    def summary(self, model: nn.Module) -> dict[str, Any]:
        """The energy threshold used and each layer's rank before/after pruning."""
        if self._last_report is None:
            return {}
        report = self._last_report
        return {
            "energy": report["energy"],
            "flops_fraction_predicted": report["flops_fraction"],
            "layers": [
                {k: row[k] for k in ("layer", "full_rank", "rank_after", "form", "energy_removed")}
                for row in report["layers"]
            ],
        }
