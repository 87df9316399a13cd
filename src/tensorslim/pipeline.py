"""The compress pipeline shared by the CLI, the demo and recipes:

measure original → plan → apply → (train with the method's hooks | fine-tune) → finalize →
measure compressed → results dict. Writing files is left to :mod:`tensorslim.report.run`.
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.calibration import FISHER
from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.latency import measure_latency
from tensorslim.analysis.profile import count_params
from tensorslim.errors import TensorslimError
from tensorslim.inputs import take_samples
from tensorslim.layers.linear_like import LinearLike
from tensorslim.methods.base import Method
from tensorslim.methods.presets import DEFAULT_PRESET, PRESET_KEY, resolve_training
from tensorslim.methods.registry import get_method, method_class
from tensorslim.plan import CompressionPlan, apply, plan, plans_of, refresh_plan, set_plans
from tensorslim.rank.budget import Budget
from tensorslim.train.batchnorm import recalibrate_batchnorm
from tensorslim.train.distributed import from_main_process
from tensorslim.train.loop import evaluate, fit
from tensorslim.train.losses import DistillFn, LossFn, cross_entropy_loss
from tensorslim.train.seeding import PhaseSeeds

# the fine-tuning settings of compress_model when neither the caller nor a preset sets them
TRAINING_DEFAULTS: dict[str, Any] = {"lr": 0.01, "optimizer": "sgd", "weight_decay": 5e-4}


def machine_facts() -> dict[str, Any]:
    """What a latency number depends on: threads, torch version, CPU count, platform."""
    import os

    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def measure(
    model: nn.Module,
    example_batch: torch.Tensor,
    test_loader: Iterable | None,
    *,
    latency: bool = True,
    min_run_time: float = 0.3,
) -> dict[str, Any]:
    """accuracy / loss (if a loader is given), params, FLOPs (per sample) and latency (batch)."""
    row: dict[str, Any] = {
        "params": count_params(model),
        "flops": count_flops(model, take_samples(example_batch, 1)),
    }
    plans = plans_of(model)
    if plans:
        row.update(nonzero_counts(model, plans, row))
    if test_loader is not None:
        row.update(evaluate(model, test_loader))
    if latency:
        lat = measure_latency(model, example_batch, min_run_time=min_run_time)
        row["latency_ms"] = lat["median_ms"]
        row["latency_batch"] = lat["batch"]
        row["latency_threads"] = lat["threads"]
    return row


def nonzero_counts(
    model: nn.Module,
    compression_plans: CompressionPlan | list[CompressionPlan],
    measured: dict[str, Any],
) -> dict[str, int]:
    """Parameters and FLOPs that remain once exact zeros in planned dense layers are skipped.

    Pruning leaves ``nn.Linear`` / ``nn.Conv2d`` at their dense shapes with zeros in the
    weight: ``params`` and ``flops`` count those zeros, a sparse kernel would not. A layer whose
    weight is a fraction z zero saves z of its weights and (with every weight used once per
    output position) z of its multiply-add FLOPs. Bias and every other parameter stay counted.
    """
    if isinstance(compression_plans, CompressionPlan):
        compression_plans = [compression_plans]
    # every stage's planned layers (a model pruned in one stage may be decomposed in the next)
    flops_of = {lp.fqn: lp.flops_before for p in compression_plans for lp in p.layers}
    zero_params, zero_flops = 0, 0.0
    for fqn, module in model.named_modules():
        if fqn in flops_of and isinstance(module, (LinearLike, nn.Conv2d)):
            weight = module.weight.detach()
            zeros = int((weight == 0).sum())
            zero_params += zeros
            zero_flops += flops_of[fqn] * zeros / max(1, weight.numel())
    return {
        "params_nonzero": measured["params"] - zero_params,
        "flops_nonzero": measured["flops"] - round(zero_flops),
    }


def layer_rows(compression_plan: CompressionPlan) -> list[dict[str, Any]]:
    """One row per planned layer, for tables and report.md."""
    rows = []
    for lp in compression_plan.layers:
        rows.append(
            {
                "layer": lp.fqn,
                "type": lp.type_name,
                "method": lp.method or "dense",
                "choice": lp.label,
                "params": lp.params_before,
                "params_after": lp.params_after,
                "flops": lp.flops_before,
                "flops_after": lp.flops_after,
                "flops_kept": lp.flops_after / lp.flops_before if lp.flops_before else 1.0,
                "error": lp.error,
                "energy_kept": lp.extra.get("energy_kept"),
                "reason": lp.reason,
            }
        )
    return rows


@dataclass
class Objectives:
    """How a model is calibrated and distilled when its batches are not (image, label) pairs.

    ``calibration_loader``: batches for data-aware methods (default: the training loader);
    ``calibration_loss_fn``: the loss whose squared gradients give the Fisher diagonal (default:
    cross-entropy on the batch's targets); ``distill_fn`` and ``kd_alpha``: the distillation
    loss and its weight when ``distill`` is on (default Hinton's KL at α = 0.5; α = 1 trains on
    unlabeled batches).
    """

    calibration_loader: Iterable | None = None
    calibration_loss_fn: LossFn | None = None
    distill_fn: DistillFn | None = None
    kd_alpha: float = 0.5


@dataclass
class _FineTuner:
    """How the pipeline trains: one configuration shared by its fine-tuning phases."""

    model: nn.Module
    train_loader: Iterable | None
    test_loader: Iterable | None
    lr: float
    optimizer: str
    weight_decay: float
    teacher: nn.Module | None
    resume: bool
    progress: bool
    log: Callable[[str], None] | None
    max_steps_per_epoch: int | None
    method: str
    objectives: Objectives = field(default_factory=Objectives)

    def train(self, epochs: int, hooks: list, directory: Path | None, what: str) -> list[dict]:
        if epochs == 0:
            return []
        if self.train_loader is None:
            raise TensorslimError("fine-tuning needs training data")
        return fit(
            self.model,
            self.train_loader,
            epochs=epochs,
            lr=self.lr,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            hooks=hooks,
            test_loader=self.test_loader,
            teacher=self.teacher,
            kd_alpha=self.objectives.kd_alpha,
            distill_fn=self.objectives.distill_fn,
            checkpoint_dir=directory,
            resume=self.resume,
            progress=self.progress,
            log=self.log,
            max_steps_per_epoch=self.max_steps_per_epoch,
            description=f"{self.method} {what}",
        ).epochs


def compress_model(
    model: nn.Module,
    *,
    method: str,
    budget: Budget | None,
    settings: dict[str, Any] | None = None,
    preset: str | None = None,
    train_loader: Iterable | None,
    test_loader: Iterable | None,
    example_batch: Any,
    finetune_epochs: int = 1,
    lr: float | None = None,
    optimizer: str | None = None,
    weight_decay: float | None = None,
    distill: bool = False,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    measure_original: dict[str, Any] | None = None,
    latency: bool = True,
    max_steps_per_epoch: int | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    post_finalize_epochs: int = 0,
    bn_recalibration_batches: int = 0,
    seed: int | None = None,
    objectives: Objectives | None = None,
    deployment: Any = None,
    allow_slower: bool | None = None,
    latency_cache: Any = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``model`` (left untouched) and return (compressed model, results dict).

    ``objectives`` (:class:`Objectives`): how to calibrate and distil on unlabeled batches.
    ``finetune_epochs`` train the applied model (with the method's hooks: regularizers or the
    pruning schedule); ``post_finalize_epochs`` then fine-tune the finalized model without hooks
    — the third stage of SVD training, where truncation left the model to recover.
    ``bn_recalibration_batches`` > 0 re-estimates BatchNorm statistics on that many training
    batches right after the layers are replaced (see :func:`recalibrate_batchnorm`), so the
    accuracy before fine-tuning measures the approximation, not stale statistics.
    With a ``seed``, the phases ``compress`` (plan, apply, BatchNorm), ``fine-tune`` and
    ``post-finalize`` each start from ``seed_phase(seed, phase)`` (results ``seeds``), so a
    ``resume`` that re-enters a phase draws what an uninterrupted run drew.

    ``preset`` (or ``settings["preset"]``) names one of the method's presets, e.g. ``"paper"``
    for the official code's settings; ``settings`` given explicitly override it. ``lr``,
    ``optimizer`` and ``weight_decay`` left at ``None`` take the preset's training values, else
    0.01, ``"sgd"`` and 5e-4.

    The results dict holds ``original`` and ``compressed`` (each: accuracy, params, flops,
    latency_ms), ``accuracy_before_finetune``, ``accuracy_after_finalize`` (before the
    post-finalize epochs), the per-layer ``layers`` rows, the ``history`` of every epoch and
    whatever the method's ``summary(model)`` adds.

    ``deployment``, ``allow_slower`` and ``latency_cache`` go to :func:`tensorslim.plan.plan`;
    when it timed layers, ``latency_check`` compares its prediction with both models measured.
    """
    if post_finalize_epochs < 0:
        raise TensorslimError(f"post_finalize_epochs must be ≥ 0, got {post_finalize_epochs}")
    started = time.perf_counter()
    original = measure_original or measure(model, example_batch, test_loader, latency=latency)
    phases = PhaseSeeds(seed, loaders=(train_loader, test_loader))
    phases.start("compress")
    settings, preset, training = _preset_and_training(
        method, settings, preset, lr=lr, optimizer=optimizer, weight_decay=weight_decay
    )
    objectives = objectives or Objectives()
    timing = {
        "deployment": deployment,
        "allow_slower": allow_slower,
        "latency_cache": latency_cache,
    }
    the_plan, method_obj, small = _plan_and_apply(
        model,
        method,
        budget,
        example_batch,
        filter_fn,
        {**settings, PRESET_KEY: preset},
        objectives.calibration_loader or train_loader,
        objectives.calibration_loss_fn,
        timing,
    )
    if bn_recalibration_batches > 0:
        if train_loader is None:
            raise TensorslimError("BatchNorm recalibration needs training data")
        recalibrate_batchnorm(small, train_loader, bn_recalibration_batches)
    applied_at = time.perf_counter()
    before = evaluate(small, test_loader) if test_loader is not None else {}
    tuner = _FineTuner(
        small, train_loader, test_loader, training["lr"], training["optimizer"],
        training["weight_decay"],
        copy.deepcopy(model).eval() if distill else None,
        resume, progress, log, max_steps_per_epoch, method, objectives,
    )  # fmt: skip
    small, history, after_finalize = _fine_tune_phases(
        tuner, method_obj, the_plan, phases, finetune_epochs, post_finalize_epochs, checkpoint_dir
    )
    compressed = measure(small, example_batch, test_loader, latency=latency)
    results = _results(method, method_obj, budget, original, compressed, latency)
    results.update(
        {
            "preset": preset or DEFAULT_PRESET,
            "training": training,
            "accuracy_before_finetune": before.get("accuracy"),
            "bn_recalibration_batches": bn_recalibration_batches,
            "accuracy_after_finalize": after_finalize.get("accuracy", compressed.get("accuracy")),
            "history": history,
            "seeds": phases.seeds,
            "seconds": {"decompose": applied_at - started, "total": time.perf_counter() - started},
        }
    )
    results.update(_plan_facts(the_plan, method_obj, model, small, example_batch, latency))
    return small, results


def _fine_tune_phases(
    tuner: _FineTuner,
    method_obj: Method,
    the_plan: CompressionPlan,
    phases: PhaseSeeds,
    finetune_epochs: int,
    post_finalize_epochs: int,
    checkpoint_dir: str | Path | None,
) -> tuple[nn.Module, list[dict], dict[str, Any]]:
    """Fine-tune with the method's hooks, finalize, then fine-tune the finalized model.

    Returns (final model, every epoch's history, the evaluation right after finalize — empty
    without post-finalize epochs). Each phase starts from its own derived seed.
    """
    hooks = method_obj.train_hooks(tuner.model, the_plan)
    if hooks and finetune_epochs == 0:
        raise TensorslimError(
            f"method '{tuner.method}' works during training: give --finetune-epochs ≥ 1"
        )
    if finetune_epochs > 0:
        phases.start("fine-tune")
    history = tuner.train(finetune_epochs, hooks, checkpoint_dir, "fine-tune")
    small = method_obj.finalize(tuner.model, the_plan)
    tuner.model = small
    set_plans(small, [refresh_plan(small, p) for p in plans_of(small)])
    after_finalize: dict[str, Any] = {}
    if post_finalize_epochs > 0:
        test_loader = tuner.test_loader
        after_finalize = evaluate(small, test_loader) if test_loader is not None else {}
        # its own directory: the first phase's last.pt belongs to another model shape
        post_dir = Path(checkpoint_dir) / "post-finalize" if checkpoint_dir else None
        phases.start("post-finalize")
        history += tuner.train(post_finalize_epochs, [], post_dir, "fine-tune after finalize")
    return small, history, after_finalize


def _plan_facts(
    the_plan: CompressionPlan,
    method_obj: Method,
    model: nn.Module,
    small: nn.Module,
    example: Any,
    latency: bool,
) -> dict[str, Any]:
    """The plan's notes, its estimate in both metrics (the measured fractions are elsewhere in
    the results), the per-layer rows of the model's last plan, the predicted latency checked
    against both models measured (when the plan timed layers) and the method's own summary."""
    facts: dict[str, Any] = {
        "plan_notes": the_plan.notes,
        "plan_summary": the_plan.summary(),
        "plan_fractions": the_plan.fractions,
        "layers": layer_rows(plans_of(small)[-1]),
    }
    if latency and the_plan.latency is not None:
        facts["latency_check"] = latency_check(model, small, the_plan, example)
    summary = method_obj.summary(small)
    if summary:
        facts["method_summary"] = summary
    return facts


def latency_check(
    original: nn.Module, compressed: nn.Module, the_plan: CompressionPlan, example: Any
) -> dict[str, Any]:
    """The plan's predicted latency against both whole models measured, interleaved, at the
    plan's deployment: ``measured_fraction`` = compressed / original, ``prediction_error`` =
    predicted / measured − 1 (as planned, before fine-tuning changed nothing structural)."""
    from tensorslim.analysis.deployment import Deployment
    from tensorslim.analysis.timing import load_average
    from tensorslim.layout import applied_deployment, is_per_chain
    from tensorslim.planner.memory_format import time_in_deployments

    record = the_plan.latency or {}
    where = Deployment(**record["deployment"])
    # memory_format="auto": the original runs in its own faster layout, as the plan compared
    layout = record.get("memory_format", {}).get("dense", where.memory_format)
    # a per-chain layout runs as apply left it (see tensorslim.layout.applied_deployment)
    small_where = applied_deployment(record)
    models = {
        "original": (original, where.in_format(layout)),
        "compressed": (compressed, small_where),
    }
    timed = time_in_deployments(models, example)
    dense, small = timed["original"].ms, timed["compressed"].ms
    return {
        "deployment": where.to_dict(),
        "original_memory_format": layout,
        "compressed_memory_format": "per_chain" if is_per_chain(record) else where.memory_format,
        "original_ms": dense,
        "compressed_ms": small,
        "speedup": dense / small,
        "measured_fraction": small / dense,
        "predicted_fraction": record["predicted_fraction"],
        "predicted_ms": record["predicted_fraction"] * dense,
        "prediction_error": record["predicted_fraction"] * dense / small - 1.0,
        "load_average": load_average(),
        # backend=compile: both models compiled first, never inside the timing
        **(
            {"compile_s": sum(t.setup_s for t in timed.values())}
            if where.backend == "compile"
            else {}
        ),
    }


def _preset_and_training(
    method: str, settings: dict[str, Any] | None, preset: str | None, **explicit: Any
) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """(settings without the preset key, the preset, the fine-tuning values): ``preset`` or
    ``settings["preset"]``; each training value is the caller's, else the preset's, else
    :data:`TRAINING_DEFAULTS`."""
    settings = dict(settings or {})
    preset = settings.pop(PRESET_KEY, None) if preset is None else preset
    training = resolve_training(method_class(method), preset, TRAINING_DEFAULTS, **explicit)
    return settings, preset, training


def _plan_and_apply(
    model: nn.Module,
    method: str,
    budget: Budget | None,
    example_batch: Any,
    filter_fn: Callable[[nn.Module, str], bool] | None,
    settings: dict[str, Any],
    train_loader: Iterable | None = None,
    calibration_loss_fn: LossFn | None = None,
    timing: dict[str, Any] | None = None,
) -> tuple[CompressionPlan, Method, nn.Module]:
    """Plan, refuse a plan that compresses nothing, apply; the method as the plan aimed it.

    A method that declares calibration needs (ASVD, SVD-LLM, FWSVD) calibrates on the first
    batches of ``train_loader`` (the Fisher diagonal from ``calibration_loss_fn``, by default
    the cross-entropy of their targets).
    """
    calibration: dict[str, Any] = {}
    needs = get_method(method, **settings).calibration_needs
    if needs:
        if train_loader is None:
            raise TensorslimError(f"method '{method}' needs calibration batches (training data)")
        calibration["calibration"] = train_loader
        if FISHER in needs:
            calibration["loss_fn"] = calibration_loss_fn or cross_entropy_loss
    # one plan for every rank: timed choices differ between processes (see from_main_process)
    the_plan = from_main_process(
        lambda: plan(
            model,
            method,
            budget,
            example_batch,
            filter_fn=filter_fn,
            **calibration,
            **(timing or {}),
            **settings,
        ),
        CompressionPlan.to_json,
        CompressionPlan.from_text,
    )
    # the plan's settings, not the caller's: the planner already aimed them at the budget
    method_obj = get_method(the_plan.method, **the_plan.settings)
    if not the_plan.compressed_layers:
        reasons = sorted({lp.reason for lp in the_plan.layers if lp.reason})
        raise TensorslimError(f"method '{method}' compressed no layer ({'; '.join(reasons)[:300]})")
    return the_plan, method_obj, apply(model, the_plan)


def _results(
    method: str,
    method_obj: Method,
    budget: Budget | None,
    original: dict[str, Any],
    compressed: dict[str, Any],
    latency: bool,
) -> dict[str, Any]:
    """The comparison of the original and the compressed model (fractions, speedup)."""
    return {
        "method": method,
        "settings": method_obj.settings(),
        "budget": budget.to_dict() if budget is not None else None,
        "original": original,
        "compressed": compressed,
        "flops_fraction": compressed["flops"] / original["flops"],
        "params_fraction": compressed["params"] / original["params"],
        # what a sparse format keeps: equal to the fractions above unless weights were pruned
        "params_nonzero_fraction": compressed.get("params_nonzero", compressed["params"])
        / original["params"],
        "flops_nonzero_fraction": compressed.get("flops_nonzero", compressed["flops"])
        / original["flops"],
        # a caller's measure_original may have been taken without latency: no speedup then
        "latency_speedup": (
            original["latency_ms"] / compressed["latency_ms"]
            if latency and compressed.get("latency_ms") and original.get("latency_ms")
            else None
        ),
        "machine": machine_facts(),
    }
