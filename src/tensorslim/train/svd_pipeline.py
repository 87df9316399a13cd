"""SVD training end to end (Yang et al., CVPR-W 2020): three stages in one call.

1. **Full-rank SVD training.** Every selected Linear/Conv2d becomes an ``SVDLinear``/``SVDConv2d``
   (U, s, V from the SVD of the trained weight, or a Kaiming-style init from scratch) and is trained
   with  task + λo·Σ L_o(U, V) + λs·Σ L_s(s)  (``SVDRegularizerHook``).
2. **Singular value pruning.** Per layer, the smallest singular values whose energy is ≤ e·Σs²
   are removed (``rank.energy_prune``); with a FLOPs target, e is found by bisection so that the
   whole model lands at or just under the target. A layer whose remaining rank does not pay
   (factorized FLOPs ≥ dense FLOPs) is merged back into a dense layer.
3. **Low-rank fine-tuning.** The pruned layers are fine-tuned in SVD form (only the active singular
   values; the orthogonality loss kept, sparsity off — as the authors' code does), then converted
   to the foundation's ``LowRankLinear``/``LowRankConv2d`` (weights U√|s|, V√|s|).

The model's structure is recorded as plans (``plan``/``apply``/``refresh_plan``), so the result
can be saved with ``tensorslim.save`` and rebuilt with ``tensorslim.load``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import collect_layer_info, count_params
from tensorslim.errors import TensorslimError
from tensorslim.layers.svd import SVDLayer, svd_layers
from tensorslim.plan import apply, plan, plans_of, refresh_plan, set_plans
from tensorslim.rank.energy_prune import (
    check_energy,
    energy_keep_count,
    energy_keep_mask,
    search_energy,
)
from tensorslim.surgery import FilterFn, replace_module
from tensorslim.train.batchnorm import recalibrate_batchnorm
from tensorslim.train.hooks import TrainHook
from tensorslim.train.loop import CHECKPOINT_NAME, evaluate, fit
from tensorslim.train.svd_regularizers import (
    SVDRegularizerHook,
    check_finite_layers,
    check_lambda,
    sparsity_function,
)

SCHEMES = ("channel", "spatial")


# ----- conversion ----------------------------------------------------------------------------
def to_svd_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    scheme: str = "channel",
    from_scratch: bool = False,
    filter_fn: FilterFn | None = None,
    exclude: Sequence[str] | None = None,
    linear: bool = False,
) -> nn.Module:
    """Turn every supported Linear/Conv2d of ``model`` (in place) into its full-rank SVD form.

    Convolutions only unless ``linear=True`` (the paper decomposes convolutions only).
    ``from_scratch=True`` ignores the dense weights and draws a Kaiming-style init per layer.
    ``filter_fn(module, fqn)`` and ``exclude`` (fqns) keep layers dense — e.g. the classifier:
    the authors' ResNets decompose only convolutions, and energy pruning of a 10-way classifier
    can leave it rank 1.
    The conversion is recorded as a plan of method ``svd_train`` (so ``tensorslim.save`` works).
    """
    names = dict(model.named_modules())
    unknown = sorted(set(exclude or ()) - set(names))
    if unknown:
        raise TensorslimError(f"cannot exclude {unknown[0]!r}: the model has no such layer")
    the_plan = plan(
        model,
        "svd_train",
        None,
        example_input,
        filter_fn=filter_fn,
        exclude=list(exclude) if exclude is not None else None,
        scheme=scheme,
        from_scratch=from_scratch,
        linear=linear,
    )
    if not the_plan.compressed_layers:
        raise TensorslimError(
            "no layer of this model can be trained in SVD form (Linear layers need linear=True)"
        )
    return apply(model, the_plan, inplace=True)


@dataclass
class SVDLayerCost:
    """One SVD layer with the input it sees: its cost at any rank, dense or factorized."""

    fqn: str
    layer: SVDLayer
    input_shape: tuple[int, ...]
    calls: int

    def factorized_flops(self, rank: int) -> int:
        return self.layer.flops_at_rank(self.input_shape, rank) * self.calls

    def dense_flops(self) -> int:
        return self.layer.dense_flops(self.input_shape) * self.calls

    def pays(self, rank: int) -> bool:
        """The factorized form at ``rank`` is cheaper than the dense layer."""
        return self.factorized_flops(rank) < self.dense_flops()

    def _bias(self) -> int:
        bias = getattr(self.layer, "bias", None)
        return bias.numel() if bias is not None else 0

    def dense_params(self) -> int:
        m, n = self.layer.matrix_shape
        return m * n + self._bias()

    def final_cost(self, rank: int, metric: str, merge_dense: bool) -> int:
        """FLOPs or params of the layer's final form (low-rank, or dense if that is cheaper)."""
        m, n = self.layer.matrix_shape
        lowrank = merge_dense is False or self.pays(rank)
        if metric == "flops":
            return self.factorized_flops(rank) if lowrank else self.dense_flops()
        return rank * (m + n) + self._bias() if lowrank else self.dense_params()


def svd_layer_costs(model: nn.Module, example_input: torch.Tensor) -> list[SVDLayerCost]:
    """Input shapes (batch of 1) of every SVD layer, by one forward pass in eval mode."""
    layers = svd_layers(model)
    infos, _ = collect_layer_info(model, example_input[:1], types=(SVDLayer,), names=layers)
    costs = []
    for fqn, layer in layers:
        info = infos.get(fqn)
        if info is None:
            raise TensorslimError(f"SVD layer '{fqn}' never runs in the forward pass")
        costs.append(SVDLayerCost(fqn, layer, tuple(info.input_shape), info.calls))
    return costs


def _model_totals(model: nn.Module, example_input: torch.Tensor, costs: list[SVDLayerCost]):
    """(FLOPs, params) of everything except the SVD layers, measured on the current model."""
    flops = count_flops(model, example_input[:1])
    params = count_params(model)
    for c in costs:
        flops -= c.factorized_flops(c.layer.active_rank())
        params -= sum(p.numel() for p in c.layer.parameters())
    return flops, params


# ----- stage 2: pruning ----------------------------------------------------------------------
def prune_svd_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    energy: float | None = None,
    target: tuple[str, float] | None = None,
    reference: tuple[int, int] | None = None,
    merge_dense: bool = True,
) -> dict[str, Any]:
    """Energy-prune every SVD layer of ``model`` (in place: the ``active`` masks change).

    Give ``energy`` (fraction of Σs² each layer may lose, in [0, 1)) or ``target`` =
    ("flops" | "params", fraction of the reference model); ``reference`` = (FLOPs, params) of the
    original dense model (default: the dense equivalent of the current model). Returns a report:
    the energy used, the fraction reached, and per layer the rank before/after and the form it
    will take ("lowrank", or "dense" where the rank left does not pay).
    """
    if (energy is None) == (target is None):
        raise TensorslimError("give exactly one of energy=… or a FLOPs/params target")
    costs = svd_layer_costs(model, example_input)
    if not costs:
        raise TensorslimError("the model has no SVD-form layers to prune")
    check_finite_layers([(c.fqn, c.layer) for c in costs])
    fixed_flops, fixed_params = _model_totals(model, example_input, costs)
    if reference is None:
        reference = (
            fixed_flops + sum(c.dense_flops() for c in costs),
            fixed_params + sum(c.dense_params() for c in costs),
        )
    ref_flops, ref_params = reference
    spectra = [c.layer.singular_values() for c in costs]
    if target is not None:
        metric, fraction = target
        if metric not in ("flops", "params"):
            raise TensorslimError(f"unknown budget metric '{metric}': use flops or params")
        energy, _ = search_energy(
            spectra,
            [lambda k, c=c: c.final_cost(k, metric, merge_dense) for c in costs],
            fixed_flops if metric == "flops" else fixed_params,
            ref_flops if metric == "flops" else ref_params,
            fraction,
        )
    energy = check_energy(float(energy))  # type: ignore[arg-type]
    rows = []
    for c, spectrum in zip(costs, spectra, strict=True):
        before = c.layer.active_rank()
        keep = energy_keep_mask(spectrum, energy, c.fqn)
        mask = c.layer.active.clone()
        mask[c.layer.active.nonzero().squeeze(1)] = keep.to(mask.device)
        total_energy = float(spectrum.double().pow(2).sum())
        removed = float(spectrum[~keep].double().pow(2).sum())
        c.layer.set_active(mask)
        after = c.layer.active_rank()
        rows.append(
            {
                "layer": c.fqn,
                "type": type(c.layer).__name__,
                "scheme": c.layer.scheme,
                "full_rank": c.layer.full_rank,
                "rank_before": before,
                "rank_after": after,
                "energy_removed": removed / total_energy if total_energy > 0 else 0.0,
                "form": "lowrank" if (not merge_dense or c.pays(after)) else "dense",
                "flops_dense": c.dense_flops(),
                "flops_full_rank": c.factorized_flops(c.layer.full_rank),
                "flops_after": c.final_cost(after, "flops", merge_dense),
                "params_after": c.final_cost(after, "params", merge_dense),
            }
        )
    flops_after = fixed_flops + sum(r["flops_after"] for r in rows)
    params_after = fixed_params + sum(r["params_after"] for r in rows)
    return {
        "energy": energy,
        "target": {target[0]: target[1]} if target is not None else None,
        "reference_flops": ref_flops,
        "reference_params": ref_params,
        "flops_after": flops_after,
        "params_after": params_after,
        "flops_fraction": flops_after / ref_flops,
        "params_fraction": params_after / ref_params,
        "layers": rows,
    }


class BudgetGate:
    """Answers "would pruning ``energy`` of each layer's Σs² already meet the budget?".

    ``metric`` is "flops" or "params", ``target`` the fraction of ``reference`` (the original
    model's count) to reach. Built once on the full-rank SVD model (the layer costs and
    everything outside the SVD layers do not change during training); each call reads the
    current singular values only, so it is cheap enough to ask every few steps.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        metric: str,
        target: float,
        reference: int,
        *,
        energy: float = 0.01,
        merge_dense: bool = True,
    ) -> None:
        if metric not in ("flops", "params"):
            raise TensorslimError(f"unknown budget metric '{metric}': use flops or params")
        self.energy = check_energy(energy)
        self.metric = metric
        self.target = float(target)
        self.reference = reference
        self.merge_dense = merge_dense
        self.costs = svd_layer_costs(model, example_input)
        fixed_flops, fixed_params = _model_totals(model, example_input, self.costs)
        self.fixed = fixed_flops if metric == "flops" else fixed_params

    def fraction(self) -> float:
        """Fraction of the reference left after pruning ``energy`` (spectra as they are now)."""
        total = self.fixed
        for c in self.costs:
            with torch.no_grad():
                keep = energy_keep_count(c.layer.singular_values(), self.energy, c.fqn)
            total += c.final_cost(keep, self.metric, self.merge_dense)
        return total / self.reference

    def __call__(self) -> bool:
        return self.fraction() <= self.target


def merge_unprofitable(model: nn.Module, report: dict[str, Any]) -> list[str]:
    """Replace the SVD layers the pruning report marked "dense" by their dense equivalent."""
    merged = []
    named = dict(model.named_modules())
    for row in report["layers"]:
        if row["form"] == "dense" and isinstance(named.get(row["layer"]), SVDLayer):
            replace_module(model, row["layer"], named[row["layer"]].to_dense())
            merged.append(row["layer"])
    _refresh_plans(model)
    return merged


def compact_svd_layers(model: nn.Module) -> None:
    """Drop pruned singular values from the parameters of every SVD layer."""
    for _, layer in svd_layers(model):
        layer.compact()
    _refresh_plans(model)


def svd_to_lowrank(model: nn.Module) -> list[str]:
    """Replace every SVD layer by its truncated ``LowRankLinear``/``LowRankConv2d``."""
    converted = []
    for fqn, layer in svd_layers(model):
        replace_module(model, fqn, layer.to_lowrank())
        converted.append(fqn)
    _refresh_plans(model)
    return converted


def finalize_svd_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    energy: float | None = None,
    target: tuple[str, float] | None = None,
    reference: tuple[int, int] | None = None,
    merge_dense: bool = True,
) -> dict[str, Any]:
    """Stage 2 plus conversion, without fine-tuning: prune, merge what does not pay, convert the
    rest to low-rank layers. Returns the pruning report."""
    report = prune_svd_model(
        model,
        example_input,
        energy=energy,
        target=target,
        reference=reference,
        merge_dense=merge_dense,
    )
    merge_unprofitable(model, report)
    svd_to_lowrank(model)
    return report


def _refresh_plans(model: nn.Module) -> None:
    plans = plans_of(model)
    if plans:
        set_plans(model, [refresh_plan(model, p) for p in plans])


# ----- the pipeline --------------------------------------------------------------------------
def _first_input(*loaders: Iterable | None) -> torch.Tensor:
    for loader in loaders:
        if loader is not None:
            for inputs, _ in loader:
                return inputs[:1]
    raise TensorslimError("no data to take an example input from: pass example_input")


def check_pipeline_settings(
    *,
    scheme: str,
    reg: str,
    lambda_o: float,
    lambda_s: float,
    energy: float | None,
    target_flops: float | None,
    epochs_train: int,
    epochs_finetune: int,
    budget_gate_energy: float | None = None,
) -> None:
    """Every setting of :func:`svd_train_pipeline` checked, so bad input fails before any work."""
    if scheme not in SCHEMES:
        raise TensorslimError(f"unknown SVD scheme '{scheme}': use 'channel' or 'spatial'")
    sparsity_function(reg)
    check_lambda(lambda_o, "lambda_o")
    check_lambda(lambda_s, "lambda_s")
    if (energy is None) == (target_flops is None):
        raise TensorslimError(
            "give exactly one of energy=… (e.g. 0.05) or target_flops=… (e.g. 0.5)"
        )
    if energy is not None:
        check_energy(energy)
    if target_flops is not None and not 0 < target_flops <= 1:
        raise TensorslimError(f"target_flops must be a fraction in (0, 1], got {target_flops}")
    if budget_gate_energy is not None:
        if target_flops is None:
            raise TensorslimError(
                "budget_gate_energy needs target_flops=… (the gate compares with the budget)"
            )
        check_energy(budget_gate_energy)
    for name, value in (("epochs_train", epochs_train), ("epochs_finetune", epochs_finetune)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TensorslimError(f"{name} must be an integer ≥ 0, got {value!r}")


def svd_train_pipeline(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    *,
    scheme: str = "channel",
    reg: str = "hoyer",
    lambda_o: float = 1.0,
    lambda_s: float = 0.01,
    energy: float | None = None,
    target_flops: float | None = None,
    epochs_train: int = 3,
    epochs_finetune: int = 1,
    from_scratch: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    lr: float = 0.05,
    finetune_lr: float | None = None,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    finetune_orthogonality: bool = True,
    merge_dense: bool = True,
    bn_recalibration_batches: int = 0,
    budget_gate_energy: float | None = None,
    example_input: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
    exclude: Sequence[str] | None = None,
    linear: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_steps_per_epoch: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Full-rank SVD training → singular value pruning → low-rank fine-tuning, in place.

    ``model``: a trained dense model (or an untrained one with ``from_scratch=True``). Exactly
    one of ``energy`` (each layer may lose that fraction of Σs², in [0, 1)) or ``target_flops``
    (fraction of the original model's FLOPs; e is searched) decides the ranks. ``reg`` is "l1",
    "hoyer" or "hoyer_square"; ``lambda_o``, ``lambda_s`` ≥ 0 weigh the two regularizers.
    ``checkpoint_dir`` keeps per-stage checkpoints (``svd_train/``, ``finetune/``), written
    atomically after each epoch; ``resume=True`` continues from them. Inside a
    ``torch.distributed`` process group ``fit`` wraps each training stage in
    DistributedDataParallel; structure changes happen on the unwrapped model between stages,
    identically on every rank (they depend only on the synchronised weights).
    ``filter_fn``/``exclude`` (fqns) keep layers dense; Linear layers are trained in SVD form
    only with ``linear=True`` (then exclude the classifier, e.g. ``exclude=["fc"]``).
    ``bn_recalibration_batches`` > 0 re-estimates BatchNorm statistics on that many training
    batches right after pruning (see :func:`recalibrate_batchnorm`); 0 follows the paper.
    ``budget_gate_energy`` (with ``target_flops``): during stage 1, every 10 steps, check whether
    pruning that fraction of each layer's Σs² would already meet the target, and leave the
    sparsity term out while it would (see :class:`BudgetGate`); None keeps λs on
    throughout, as in the paper.

    Returns (model with LowRank*/dense layers, report dict): per-layer rank before/after,
    FLOPs/params of the original, full-rank SVD, pruned and final model, accuracies at each
    stage (when ``test_loader`` is given) and both training histories.
    """
    check_pipeline_settings(
        scheme=scheme,
        reg=reg,
        lambda_o=lambda_o,
        lambda_s=lambda_s,
        energy=energy,
        target_flops=target_flops,
        epochs_train=epochs_train,
        epochs_finetune=epochs_finetune,
        budget_gate_energy=budget_gate_energy,
    )
    started = time.perf_counter()
    x = example_input[:1] if example_input is not None else _first_input(test_loader, train_loader)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None

    def measure(stage_model: nn.Module) -> dict[str, Any]:
        row: dict[str, Any] = {
            "params": count_params(stage_model),
            "flops": count_flops(stage_model, x),
        }
        if test_loader is not None:
            row["accuracy"] = evaluate(stage_model, test_loader)["accuracy"]
        return row

    def train(stage: str, epochs: int, hooks: list[TrainHook], stage_lr: float) -> list[dict]:
        if epochs == 0:
            return []
        stage_dir = ckpt / stage if ckpt is not None else None
        for hook in hooks:
            if isinstance(hook, SVDRegularizerHook) and stage_dir is not None:
                hook.where = f" (last good checkpoint kept at {stage_dir / CHECKPOINT_NAME})"
        return fit(
            model,
            train_loader,
            epochs=epochs,
            lr=stage_lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            hooks=hooks,
            test_loader=test_loader,
            checkpoint_dir=stage_dir,
            resume=resume,
            progress=progress,
            log=log,
            max_steps_per_epoch=max_steps_per_epoch,
            description=f"svd-train {stage}",
        ).epochs

    original = measure(model)
    if from_scratch:
        original.pop("accuracy", None)  # an untrained model's accuracy means nothing
    reference = (original["flops"], original["params"])

    # stage 1: full-rank SVD training
    to_svd_model(
        model,
        x,
        scheme=scheme,
        from_scratch=from_scratch,
        filter_fn=filter_fn,
        exclude=exclude,
        linear=linear,
    )
    full_rank = {"params": count_params(model), "flops": count_flops(model, x)}
    gate = None
    if budget_gate_energy is not None:
        gate = BudgetGate(
            model,
            x,
            "flops",
            float(target_flops),
            reference[0],
            energy=budget_gate_energy,
            merge_dense=merge_dense,
        )
    hook = SVDRegularizerHook(lambda_o, lambda_s, reg, sparsity_gate=gate)
    history_train = train("svd_train", epochs_train, [hook], lr)
    if test_loader is not None:
        full_rank["accuracy"] = evaluate(model, test_loader)["accuracy"]
    trained_at = time.perf_counter()

    # stage 2: singular value pruning (+ merge what does not pay)
    prune_report = prune_svd_model(
        model,
        x,
        energy=energy,
        target=("flops", float(target_flops)) if target_flops is not None else None,
        reference=reference,
        merge_dense=merge_dense,
    )
    merge_unprofitable(model, prune_report)
    compact_svd_layers(model)
    if bn_recalibration_batches > 0:
        recalibrate_batchnorm(model, train_loader, bn_recalibration_batches)
    pruned = measure(model)

    # stage 3: low-rank fine-tuning (in SVD form, orthogonality kept, no sparsity)
    finetune_hooks: list[TrainHook] = []
    if svd_layers(model):
        finetune_hooks.append(
            SVDRegularizerHook(lambda_o if finetune_orthogonality else 0.0, 0.0, reg)
        )
    history_finetune = train(
        "finetune", epochs_finetune, finetune_hooks, finetune_lr if finetune_lr is not None else lr
    )
    svd_to_lowrank(model)
    final = measure(model)
    if final["flops"] != prune_report["flops_after"]:
        # the analytic count and the counter disagree: a bug, never silently accepted
        raise TensorslimError(
            f"internal: predicted {prune_report['flops_after']} FLOPs after pruning, measured "
            f"{final['flops']}"
        )
    report = {
        "scheme": scheme,
        "reg": reg,
        "lambda_o": lambda_o,
        "lambda_s": lambda_s,
        "from_scratch": from_scratch,
        "energy": prune_report["energy"],
        "target_flops": target_flops,
        "budget_gate_energy": budget_gate_energy if gate is not None else None,
        "original": original,
        "svd_full_rank": full_rank,
        "pruned": pruned,
        "final": final,
        "flops_fraction": final["flops"] / original["flops"],
        "flops_reduction": original["flops"] / final["flops"],
        "params_fraction": final["params"] / original["params"],
        "layers": prune_report["layers"],
        "history": {"svd_train": history_train, "finetune": history_finetune},
        "seconds": {
            "svd_train": trained_at - started,
            "total": time.perf_counter() - started,
        },
    }
    return model, report
