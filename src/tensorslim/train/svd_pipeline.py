"""SVD training end to end (Yang et al., CVPR-W 2020): the stages of the method ``svd_train``.

1. **Decompose.** Every selected Linear/Conv2d becomes an ``SVDLinear``/``SVDConv2d`` (U, s, V
   from the SVD of the trained weight, or a Kaiming-style init from scratch), planned and applied
   as the method ``svd_train``.
2. **Full-rank SVD training** with task + λo·Σ L_o(U, V) + λs·Σ L_s(s): the method's
   ``train_hooks`` (``SVDRegularizerHook``, optionally gated by a ``BudgetGate``); optionally
   preceded by epochs with the orthogonality loss only (the official code's first run).
3. **Singular value pruning**: the method's ``prune`` (energy pruning, e searched for a FLOPs
   target; layers whose rank does not pay merged back to dense; :mod:`tensorslim.train.svd_prune`).
4. **Low-rank fine-tuning** in SVD form (only the active singular values; the orthogonality loss
   kept, sparsity off — as the authors' code does: the method's ``orthogonality_hooks``), then
   conversion to the foundation's ``LowRankLinear``/``LowRankConv2d`` (weights U√|s|, V√|s|).

:class:`SVDTrainConfig` holds the settings (``preset="paper"``: the official code's training),
:class:`SVDTrainRun` the data and where the state is kept; :func:`svd_train_pipeline` composes
the stages. The model's structure is recorded as plans (``plan``/``apply``/``refresh_plan``), so
the result can be saved with ``tensorslim.save`` and rebuilt with ``tensorslim.load``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import count_params
from tensorslim.errors import TensorslimError
from tensorslim.plan import CompressionPlan, apply, plan, plans_of
from tensorslim.rank.budget import Budget
from tensorslim.rank.energy_prune import check_energy
from tensorslim.surgery import FilterFn
from tensorslim.train.batchnorm import recalibrate_batchnorm
from tensorslim.train.hooks import TrainHook
from tensorslim.train.loop import CHECKPOINT_NAME, SCHEDULES, evaluate, fit
from tensorslim.train.seeding import PhaseSeeds
from tensorslim.train.svd_prune import (  # noqa: F401  (re-exported: the pipeline's public parts)
    BudgetGate,
    SVDLayerCost,
    compact_svd_layers,
    finalize_svd_model,
    merge_unprofitable,
    prune_and_merge,
    prune_svd_model,
    svd_layer_costs,
    svd_to_lowrank,
)
from tensorslim.train.svd_regularizers import SVDRegularizerHook, check_lambda, sparsity_function

if TYPE_CHECKING:
    from tensorslim.methods.svd_train import SVDTrainMethod

SCHEMES = ("channel", "spatial")
# the seeded phases, in order; the training ones name their checkpoint directories too
PHASES = ("decompose", "orthogonal", "svd_train", "prune", "finetune")
# what a setting left at None becomes when the preset does not set it (the method's own
# defaults for reg, lambda_o and lambda_s are read from SVDTrainMethod)
TRAINING_DEFAULTS: dict[str, Any] = {
    "lr": 0.05,
    "optimizer": "sgd",
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "bn_recalibration_batches": 0,
}


def to_svd_model(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    scheme: str = "channel",
    from_scratch: bool = False,
    filter_fn: FilterFn | None = None,
    exclude: Sequence[str] | None = None,
    linear: bool = False,
    budget: Budget | None = None,
    **settings: Any,
) -> nn.Module:
    """Turn every supported Linear/Conv2d of ``model`` (in place) into its full-rank SVD form.

    Convolutions only unless ``linear=True`` (the paper decomposes convolutions only).
    ``from_scratch=True`` ignores the dense weights and draws a Kaiming-style init per layer.
    ``filter_fn(module, fqn)`` and ``exclude`` (fqns) keep layers dense — e.g. the classifier:
    the authors' ResNets decompose only convolutions, and energy pruning of a 10-way classifier
    can leave it rank 1. The conversion is recorded as a plan of method ``svd_train`` (so
    ``tensorslim.save`` works), aimed at ``budget`` and with the method's other ``settings``.
    """
    names = dict(model.named_modules())
    unknown = sorted(set(exclude or ()) - set(names))
    if unknown:
        raise TensorslimError(f"cannot exclude {unknown[0]!r}: the model has no such layer")
    the_plan = plan(
        model,
        "svd_train",
        budget,
        example_input,
        filter_fn=filter_fn,
        exclude=list(exclude) if exclude is not None else None,
        scheme=scheme,
        from_scratch=from_scratch,
        linear=linear,
        **settings,
    )
    if not the_plan.compressed_layers:
        raise TensorslimError(
            "no layer of this model can be trained in SVD form (Linear layers need linear=True)"
        )
    return apply(model, the_plan, inplace=True)


@dataclass
class SVDTrainConfig:
    """Every setting of :func:`svd_train_pipeline`, checked when made (bad input fails before
    any work).

    ``preset`` names a preset of the method ``svd_train`` (``"paper"``: the official code's
    training, see ``SVD_TRAIN_PAPER``): every setting left at ``None`` takes the preset's value,
    else the default (:data:`TRAINING_DEFAULTS`, the method's own for ``reg``, ``lambda_o``,
    ``lambda_s``); after construction every setting holds its resolved value.

    Exactly one of ``energy`` (each layer may lose that fraction of Σs², in [0, 1)) or
    ``target_flops`` (fraction of the original model's FLOPs; e is searched) decides the ranks.
    ``reg`` is "l1", "hoyer" or "hoyer_square"; ``lambda_o``, ``lambda_s`` ≥ 0 weigh the two
    regularizers. ``epochs_orthogonal`` epochs with the orthogonality loss only come first (the
    official code's first run; 0 skips them), then ``epochs_train`` with both and, after
    pruning, ``epochs_finetune``; at ``lr`` (fine-tune: ``finetune_lr``, default ``lr``) with
    ``optimizer``, ``weight_decay`` and the learning-rate ``schedule`` of each ``fit``
    ("cosine", "constant", "step").
    ``from_scratch`` ignores the dense weights; ``filter_fn``/``exclude`` (fqns) keep layers
    dense; Linear layers are trained in SVD form only with ``linear=True`` (then exclude the
    classifier). ``bn_recalibration_batches`` > 0 re-estimates BatchNorm statistics on that many
    training batches right after pruning (0 follows the paper). ``budget_gate_energy`` (with
    ``target_flops``): every 10 steps of stage 2, check whether pruning that fraction of each
    layer's Σs² would already meet the target, and leave the sparsity term out while it would
    (:class:`BudgetGate`; None keeps λs on throughout, as in the paper).
    ``finetune_orthogonality`` keeps λo in stage 4; ``merge_dense`` merges layers whose rank does
    not pay back into dense ones.
    """

    scheme: str = "channel"
    reg: str | None = None  # None: the preset's, else "hoyer"
    lambda_o: float | None = None  # None: the preset's, else 1.0
    lambda_s: float | None = None  # None: the preset's, else 0.01
    energy: float | None = None
    target_flops: float | None = None
    epochs_train: int = 3
    epochs_finetune: int = 1
    epochs_orthogonal: int = 0
    from_scratch: bool = False
    lr: float | None = None
    finetune_lr: float | None = None
    optimizer: str | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    finetune_orthogonality: bool = True
    merge_dense: bool = True
    bn_recalibration_batches: int | None = None
    budget_gate_energy: float | None = None
    linear: bool = False
    exclude: Sequence[str] | None = None
    filter_fn: FilterFn | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        self._resolve_preset()
        if self.scheme not in SCHEMES:
            raise TensorslimError(f"unknown SVD scheme '{self.scheme}': use 'channel' or 'spatial'")
        sparsity_function(self.reg)
        check_lambda(self.lambda_o, "lambda_o")
        check_lambda(self.lambda_s, "lambda_s")
        if self.schedule not in SCHEDULES:
            raise TensorslimError(f"unknown schedule '{self.schedule}': use {', '.join(SCHEDULES)}")
        if self.optimizer not in ("sgd", "adam"):
            raise TensorslimError(f"unknown optimizer '{self.optimizer}': use 'sgd' or 'adam'")
        self._check_pruning()
        for name in ("epochs_train", "epochs_finetune", "epochs_orthogonal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TensorslimError(f"{name} must be an integer ≥ 0, got {value!r}")

    def _resolve_preset(self) -> None:
        """Fill every setting left at None from the preset, else from the defaults."""
        from tensorslim.methods.presets import DEFAULT_PRESET, get_preset
        from tensorslim.methods.svd_train import SVDTrainMethod

        preset = get_preset(SVDTrainMethod, self.preset)
        chosen = {**preset.settings, **preset.training}
        method_defaults = {f.name: f.default for f in dataclasses.fields(SVDTrainMethod)}
        defaults = {k: method_defaults[k] for k in ("reg", "lambda_o", "lambda_s")}
        for name, default in {**defaults, **TRAINING_DEFAULTS, "finetune_lr": None}.items():
            if getattr(self, name) is None:
                setattr(self, name, chosen.get(name, default))
        self.preset = self.preset or DEFAULT_PRESET

    def _check_pruning(self) -> None:
        energy, target = self.energy, self.target_flops
        if (energy is None) == (target is None):
            raise TensorslimError(
                "give exactly one of energy=… (e.g. 0.05) or target_flops=… (e.g. 0.5)"
            )
        if energy is not None:
            check_energy(energy)
        if target is not None and not 0 < target <= 1:
            raise TensorslimError(f"target_flops must be a fraction in (0, 1], got {target}")
        if self.budget_gate_energy is not None:
            if target is None:
                raise TensorslimError(
                    "budget_gate_energy needs target_flops=… (the gate compares with the budget)"
                )
            check_energy(self.budget_gate_energy)

    @classmethod
    def of(cls, config: SVDTrainConfig | None, settings: dict[str, Any]) -> SVDTrainConfig:
        """``config`` (default: the defaults) with ``settings`` replaced; unknown names fail."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TensorslimError(
                f"svd_train_pipeline has no setting '{unknown[0]}' (its settings: "
                f"{', '.join(names)})"
            )
        return dataclasses.replace(config, **settings) if config else cls(**settings)

    def budget(self) -> Budget | None:
        """The plan's budget: the FLOPs target (None in energy mode)."""
        return Budget(flops=self.target_flops) if self.target_flops is not None else None

    def method_settings(self) -> dict[str, Any]:
        """The settings of the method ``svd_train`` that these choose (the plan records them)."""
        keys = ("reg", "lambda_o", "lambda_s", "energy", "merge_dense", "budget_gate_energy")
        return {k: getattr(self, k) for k in keys}

    def summary(self) -> dict[str, Any]:
        """The settings the report names (JSON-ready)."""
        keys = ("scheme", "reg", "lambda_o", "lambda_s", "from_scratch", "target_flops", "preset")
        training = ("optimizer", "lr", "finetune_lr", "weight_decay", "schedule")
        return {
            **{k: getattr(self, k) for k in keys},
            "training": {k: getattr(self, k) for k in training},
        }


@dataclass
class SVDTrainRun:
    """The data of one pipeline run and where its state is kept.

    ``example_input`` is one sample (batch of 1) for shapes and FLOPs; ``checkpoint_dir`` keeps
    one directory per training stage (``svd_train/``, ``finetune/``), written atomically after
    each epoch; ``resume`` continues from them. ``phases`` seeds each phase (:data:`PHASES`).
    """

    train_loader: Iterable
    test_loader: Iterable | None
    example_input: torch.Tensor
    checkpoint_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] | None = None
    max_steps_per_epoch: int | None = None
    phases: PhaseSeeds = field(default_factory=lambda: PhaseSeeds(None))

    def measure(self, model: nn.Module, *, accuracy: bool = True) -> dict[str, Any]:
        """Params, FLOPs (at batch 1) and — with a test loader — the accuracy of ``model``."""
        row: dict[str, Any] = {
            "params": count_params(model),
            "flops": count_flops(model, self.example_input),
        }
        if accuracy and self.test_loader is not None:
            row["accuracy"] = evaluate(model, self.test_loader)["accuracy"]
        return row

    def train(
        self,
        model: nn.Module,
        cfg: SVDTrainConfig,
        stage: str,
        epochs: int,
        hooks: list[TrainHook],
        lr: float,
    ) -> list[dict]:
        """``fit`` one training stage with its hooks, checkpointed under ``stage``."""
        if epochs == 0:
            return []
        stage_dir = self.checkpoint_dir / stage if self.checkpoint_dir is not None else None
        for hook in hooks:
            if isinstance(hook, SVDRegularizerHook) and stage_dir is not None:
                hook.where = f" (last good checkpoint kept at {stage_dir / CHECKPOINT_NAME})"
        return fit(
            model,
            self.train_loader,
            epochs=epochs,
            lr=lr,
            optimizer=cfg.optimizer,
            weight_decay=cfg.weight_decay,
            schedule=cfg.schedule,
            hooks=hooks,
            test_loader=self.test_loader,
            checkpoint_dir=stage_dir,
            resume=self.resume,
            progress=self.progress,
            log=self.log,
            max_steps_per_epoch=self.max_steps_per_epoch,
            description=f"svd-train {stage}",
        ).epochs


# ----- the stages ----------------------------------------------------------------------------
def decompose_stage(
    model: nn.Module, cfg: SVDTrainConfig, run: SVDTrainRun
) -> tuple[CompressionPlan, SVDTrainMethod]:
    """Stage 1: plan and apply ``svd_train`` (full rank); the plan and the method it planned."""
    from tensorslim.methods import get_method

    to_svd_model(
        model,
        run.example_input,
        scheme=cfg.scheme,
        from_scratch=cfg.from_scratch,
        filter_fn=cfg.filter_fn,
        exclude=cfg.exclude,
        linear=cfg.linear,
        budget=cfg.budget(),
        **cfg.method_settings(),
    )
    the_plan = plans_of(model)[-1]
    return the_plan, get_method(the_plan.method, **the_plan.settings)  # type: ignore[return-value]


def orthogonal_stage(
    model: nn.Module, cfg: SVDTrainConfig, run: SVDTrainRun, method: SVDTrainMethod
) -> list[dict]:
    """Optional first training stage: the orthogonality loss only (λo·Σ L_o, no sparsity), as
    the official code's first run (``--reg_type None``); the epoch history."""
    hooks = method.orthogonality_hooks(model)
    return run.train(model, cfg, "orthogonal", cfg.epochs_orthogonal, hooks, cfg.lr)


def regularized_stage(
    model: nn.Module,
    cfg: SVDTrainConfig,
    run: SVDTrainRun,
    the_plan: CompressionPlan,
    method: SVDTrainMethod,
) -> list[dict]:
    """Stage 2: full-rank training with the method's regularizers; the epoch history."""
    hooks = method.train_hooks(model, the_plan)
    return run.train(model, cfg, "svd_train", cfg.epochs_train, hooks, cfg.lr)


def prune_stage(
    model: nn.Module,
    cfg: SVDTrainConfig,
    run: SVDTrainRun,
    the_plan: CompressionPlan,
    method: SVDTrainMethod,
) -> dict[str, Any]:
    """Stage 3: the method's energy pruning (and merging), pruned values dropped from the
    parameters, BatchNorm re-estimated if asked; the pruning report."""
    report = method.prune(model, the_plan)
    compact_svd_layers(model)
    if cfg.bn_recalibration_batches > 0:
        recalibrate_batchnorm(model, run.train_loader, cfg.bn_recalibration_batches)
    return report


def finetune_stage(
    model: nn.Module, cfg: SVDTrainConfig, run: SVDTrainRun, method: SVDTrainMethod
) -> list[dict]:
    """Stage 4: fine-tune in SVD form (the method's fine-tune hooks), then convert to low rank."""
    hooks = method.orthogonality_hooks(model, keep=cfg.finetune_orthogonality)
    lr = cfg.finetune_lr if cfg.finetune_lr is not None else cfg.lr
    history = run.train(model, cfg, "finetune", cfg.epochs_finetune, hooks, lr)
    svd_to_lowrank(model)
    return history


# ----- the pipeline --------------------------------------------------------------------------
def _first_input(*loaders: Iterable | None) -> torch.Tensor:
    for loader in loaders:
        if loader is not None:
            for inputs, _ in loader:
                return inputs[:1]
    raise TensorslimError("no data to take an example input from: pass example_input")


def check_pipeline_settings(**settings: Any) -> SVDTrainConfig:
    """Every setting of :func:`svd_train_pipeline` checked (the :class:`SVDTrainConfig`)."""
    return SVDTrainConfig.of(None, settings)


def svd_train_pipeline(
    model: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable | None = None,
    config: SVDTrainConfig | None = None,
    *,
    example_input: torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    max_steps_per_epoch: int | None = None,
    seed: int | None = None,
    **settings: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Decompose → full-rank SVD training → singular value pruning → low-rank fine-tuning.

    ``model`` (changed in place): a trained dense model, or an untrained one with
    ``from_scratch=True``. ``config`` and ``settings`` (the fields of :class:`SVDTrainConfig`,
    which override ``config``'s) say what to do; the rest where (:class:`SVDTrainRun`). With a
    ``seed`` each phase (:data:`PHASES`) starts from ``seed_phase(seed, phase)``, so a
    ``resume`` that enters a phase fresh draws what an uninterrupted run drew. Inside a
    ``torch.distributed`` process group ``fit`` wraps each training stage in
    DistributedDataParallel; structure changes happen between stages, identically on every rank.

    Returns (model with LowRank*/dense layers, report dict): per-layer rank before/after,
    FLOPs/params of the original, full-rank SVD, pruned and final model, accuracies at each
    stage (when ``test_loader`` is given), both training histories and the phase ``seeds``.
    """
    cfg = SVDTrainConfig.of(config, settings)
    x = example_input[:1] if example_input is not None else _first_input(test_loader, train_loader)
    run = SVDTrainRun(
        train_loader, test_loader, x,
        Path(checkpoint_dir) if checkpoint_dir is not None else None,
        resume, progress, log, max_steps_per_epoch,
        PhaseSeeds(seed, loaders=(train_loader, test_loader)),
    )  # fmt: skip
    return model, run_stages(model, cfg, run)


def run_stages(model: nn.Module, cfg: SVDTrainConfig, run: SVDTrainRun) -> dict[str, Any]:
    """The four stages on ``model`` (in place), each phase seeded by ``run.phases``, measured
    before and after; the pipeline's report (see :func:`svd_train_pipeline`)."""
    started = time.perf_counter()
    stages: dict[str, Any] = {"original": run.measure(model)}
    if cfg.from_scratch:
        stages["original"].pop("accuracy", None)  # an untrained model's accuracy means nothing
    run.phases.start("decompose")
    the_plan, method = decompose_stage(model, cfg, run)
    stages["svd_full_rank"] = run.measure(model, accuracy=False)
    history = {}
    if cfg.epochs_orthogonal > 0:
        run.phases.start("orthogonal")
    history["orthogonal"] = orthogonal_stage(model, cfg, run, method)
    run.phases.start("svd_train")
    history["svd_train"] = regularized_stage(model, cfg, run, the_plan, method)
    if run.test_loader is not None:
        stages["svd_full_rank"]["accuracy"] = evaluate(model, run.test_loader)["accuracy"]
    trained_at = time.perf_counter()
    run.phases.start("prune")
    prune_report = prune_stage(model, cfg, run, the_plan, method)
    stages["pruned"] = run.measure(model)
    run.phases.start("finetune")
    history["finetune"] = finetune_stage(model, cfg, run, method)
    stages["final"] = run.measure(model)
    if stages["final"]["flops"] != prune_report["flops_after"]:
        # the analytic count and the counter disagree: a bug, never silently accepted
        raise TensorslimError(
            f"internal: predicted {prune_report['flops_after']} FLOPs after pruning, measured "
            f"{stages['final']['flops']}"
        )
    report = _report(cfg, stages, prune_report, run)
    report["history"] = history
    report["seconds"] = {"svd_train": trained_at - started, "total": time.perf_counter() - started}
    return report


def _report(
    cfg: SVDTrainConfig, stages: dict[str, Any], prune_report: dict[str, Any], run: SVDTrainRun
) -> dict[str, Any]:
    """The pipeline's report: settings, measurements of each stage, fractions, ranks, seeds."""
    original, final = stages["original"], stages["final"]
    return {
        **cfg.summary(),
        "energy": prune_report["energy"],
        "budget_gate_energy": cfg.budget_gate_energy,
        **stages,
        "flops_fraction": final["flops"] / original["flops"],
        "flops_reduction": original["flops"] / final["flops"],
        "params_fraction": final["params"] / original["params"],
        "layers": prune_report["layers"],
        "seeds": run.phases.seeds,
    }
