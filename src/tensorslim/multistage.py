"""Multi-stage compression: compress a few layers, fine-tune, continue (as MUSCO does).

Gusak et al. ("MUSCO: Multi-Stage Compression of neural networks", ICCVW 2019) report that
compressing in stages loses less accuracy than compressing every layer at once: each fine-tune
only has to repair the damage done to one group of layers while the rest is still intact.

The layers a method supports are split, in forward order, into ``stages`` contiguous groups (or
the caller gives the groups). Stage k plans only group k, applies the plan, and fine-tunes the
whole network for ``epochs_per_stage`` epochs. With a budget (fraction f of the original model's
FLOPs or params), stage k aims at

    target_k = total − (1 − f)·total · (cost of groups 1..k) / (cost of all groups),

so the savings are spread over the stages in proportion to the layers they touch and the last
stage lands on f; a stage whose target an earlier stage already met is skipped. Without a budget
each stage uses the method's per-layer rule (e.g. Tucker-2 with VBMF ranks, optionally weakened
with ``weaken``). Every stage's plan is recorded on the model, so ``tensorslim.save`` / ``load``
rebuild all stages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from tensorslim.analysis.profile import COMPRESSIBLE, collect_layer_info
from tensorslim.errors import TensorslimError
from tensorslim.inputs import take_samples
from tensorslim.methods.registry import get_method
from tensorslim.pipeline import compress_model, measure
from tensorslim.rank.budget import Budget


def stage_groups(
    model: nn.Module,
    method: str,
    example_input: Any,
    stages: int,
    *,
    settings: dict[str, Any] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[list[str]]:
    """The layers ``method`` supports, in forward order, split into at most ``stages`` contiguous
    non-empty groups of about equal dense FLOPs (fewer when one layer dominates the FLOPs)."""
    if stages < 1:
        raise TensorslimError(f"multistage needs at least 1 stage, got {stages}")
    chosen = get_method(method, **(settings or {}))
    infos, _ = collect_layer_info(model, take_samples(example_input, 1), types=COMPRESSIBLE)
    named = dict(model.named_modules())
    layers = [
        (fqn, infos[fqn].flops)  # summed over calls
        for fqn, module in named.items()
        if fqn in infos
        and isinstance(module, COMPRESSIBLE)
        and chosen.supports(module, fqn) is None
        and (filter_fn is None or filter_fn(module, fqn))
    ]
    if not layers:
        raise TensorslimError(f"method '{method}' supports no layer of this model")
    total = sum(cost for _, cost in layers) or 1
    groups: list[list[str]] = [[] for _ in range(min(stages, len(layers)))]
    done = 0
    for fqn, cost in layers:
        # The group of a layer is set by where its FLOPs midpoint falls in the cumulative FLOPs.
        groups[min(int((done + cost / 2) / total * len(groups)), len(groups) - 1)].append(fqn)
        done += cost
    return [g for g in groups if g]


def stage_targets(total: float, fraction: float, group_costs: Sequence[float]) -> list[float]:
    """Absolute cost targets after each stage (see the module docstring)."""
    whole = sum(group_costs) or 1.0
    targets, covered = [], 0.0
    for cost in group_costs:
        covered += cost
        targets.append(total - (1.0 - fraction) * total * covered / whole)
    return targets


def multistage(
    model: nn.Module,
    *,
    method: str = "tucker",
    train_loader: Iterable,
    test_loader: Iterable | None,
    example_batch: Any,
    stages: int = 3,
    groups: list[list[str]] | None = None,
    budget: Budget | str | None = None,
    settings: dict[str, Any] | None = None,
    epochs_per_stage: int = 1,
    lr: float = 0.01,
    optimizer: str = "sgd",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    latency: bool = True,
    max_steps_per_epoch: int | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Compress ``model`` (left untouched) in stages with fine-tuning between them.

    Returns the compressed model (with one plan per stage recorded on it) and one results dict
    per stage (as :func:`tensorslim.pipeline.compress_model` returns them, plus ``stage``,
    ``layers_in_stage`` and ``target_fraction``).
    """
    settings = dict(settings or {})
    budget = Budget.coerce(budget)
    if epochs_per_stage < 0:
        raise TensorslimError(f"epochs_per_stage must be ≥ 0, got {epochs_per_stage}")
    groups = _groups(model, method, example_batch, stages, groups, settings, filter_fn)
    say = log or (lambda _m: None)
    original = measure(model, example_batch, test_loader, latency=latency)
    targets = _targets(model, example_batch, groups, budget, original)
    current, previous = model, original
    results: list[dict[str, Any]] = []
    for k, group in enumerate(groups):
        stage_budget, note = _stage_budget(budget, targets[k], previous, original)
        say(
            f"stage {k + 1}/{len(groups)}: "
            + (note or _describe(group, budget, targets[k], original))
        )
        if note:
            continue  # an earlier stage overshot (whole rank steps): this target is met already
        current, result = compress_model(
            current,
            method=method,
            budget=stage_budget,
            settings=settings,
            train_loader=train_loader,
            test_loader=test_loader,
            example_batch=example_batch,
            finetune_epochs=epochs_per_stage,
            lr=lr,
            optimizer=optimizer,
            progress=progress,
            log=log,
            measure_original=previous,
            latency=latency,
            max_steps_per_epoch=max_steps_per_epoch,
            filter_fn=lambda _m, fqn, members=set(group): fqn in members,
        )
        previous = result["compressed"]
        _relative_to_original(result, k, group, budget, targets[k], original, latency)
        say(
            f"stage {k + 1}: FLOPs {result['flops_fraction']:.3f} of the original, accuracy "
            f"{previous.get('accuracy', float('nan')):.4f}"
        )
        results.append(result)
    return current, results


def _groups(
    model: nn.Module,
    method: str,
    example_batch: Any,
    stages: int,
    groups: list[list[str]] | None,
    settings: dict[str, Any],
    filter_fn: Callable[[nn.Module, str], bool] | None,
) -> list[list[str]]:
    """The caller's groups (checked) or :func:`stage_groups`."""
    if groups is None:
        return stage_groups(
            model, method, example_batch, stages, settings=settings, filter_fn=filter_fn
        )
    named = dict(model.named_modules())
    missing = [f for g in groups for f in g if f not in named]
    if missing:
        raise TensorslimError(f"multistage group names unknown layer {missing[0]!r}")
    groups = [list(g) for g in groups if g]
    if not groups:
        raise TensorslimError("multistage needs at least one non-empty group of layers")
    return groups


def _targets(
    model: nn.Module,
    example_batch: Any,
    groups: list[list[str]],
    budget: Budget | None,
    original: dict[str, Any],
) -> list[float | None]:
    """The absolute cost each stage aims at (None per stage without a budget)."""
    if budget is None:
        return [None] * len(groups)
    infos, _ = collect_layer_info(model, take_samples(example_batch, 1), types=COMPRESSIBLE)
    metric = budget.metric
    costs = [
        sum((infos[f].flops if metric == "flops" else infos[f].params) for f in g if f in infos)
        for g in groups
    ]
    return list(stage_targets(float(original[metric]), budget.fraction, costs))


def _stage_budget(
    budget: Budget | None, target: float | None, previous: dict[str, Any], original: dict
) -> tuple[Budget | None, str]:
    """The stage's budget relative to the model it starts from, or why the stage is skipped."""
    if budget is None or target is None:
        return None, ""
    now = float(previous[budget.metric])
    if now <= target:
        fraction = now / float(original[budget.metric])
        return None, f"target already met ({fraction:.3f} of the original {budget.metric}), skipped"
    return Budget(**{budget.metric: max(target / now, 1e-6)}), ""


def _describe(group: list[str], budget: Budget | None, target: float | None, original) -> str:
    text = f"{len(group)} layer(s) ({', '.join(group[:4])}{'…' if len(group) > 4 else ''})"
    if budget is not None and target is not None:
        text += f", target {target / float(original[budget.metric]):.3f} of the original"
        text += f" {budget.metric}"
    return text


def _relative_to_original(
    result: dict[str, Any],
    k: int,
    group: list[str],
    budget: Budget | None,
    target: float | None,
    original: dict[str, Any],
    latency: bool,
) -> None:
    """Report the stage against the *original* model; keep its own numbers as ``stage_*``."""
    compressed = result["compressed"]
    result["stage"] = k + 1
    result["layers_in_stage"] = list(group)
    result["target_fraction"] = (
        target / float(original[budget.metric]) if budget is not None and target else None
    )
    result["stage_budget"] = result["budget"]
    if result["target_fraction"] is not None:
        result["budget"] = {budget.metric: round(result["target_fraction"], 4)}  # type: ignore[union-attr]
    result["stage_original"] = result["original"]
    result["original"] = original
    result["flops_fraction"] = compressed["flops"] / original["flops"]
    result["params_fraction"] = compressed["params"] / original["params"]
    if latency and compressed.get("latency_ms") and original.get("latency_ms"):
        result["latency_speedup"] = original["latency_ms"] / compressed["latency_ms"]
