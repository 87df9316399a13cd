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

import torch
from torch import nn

from tensorslim.analysis.profile import COMPRESSIBLE, collect_layer_info
from tensorslim.errors import TensorslimError
from tensorslim.inputs import take_samples
from tensorslim.methods.registry import get_method
from tensorslim.rank.budget import Budget


def stage_groups(
    model: nn.Module,
    method: str,
    example_input: torch.Tensor,
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
    example_batch: torch.Tensor,
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
    from tensorslim.pipeline import compress_model, measure

    settings = dict(settings or {})
    if isinstance(budget, str):
        budget = Budget.parse(budget)
    if epochs_per_stage < 0:
        raise TensorslimError(f"epochs_per_stage must be ≥ 0, got {epochs_per_stage}")
    if groups is None:
        groups = stage_groups(
            model, method, example_batch, stages, settings=settings, filter_fn=filter_fn
        )
    else:
        named = dict(model.named_modules())
        missing = [f for g in groups for f in g if f not in named]
        if missing:
            raise TensorslimError(f"multistage group names unknown layer {missing[0]!r}")
        groups = [list(g) for g in groups if g]
    if not groups:
        raise TensorslimError("multistage needs at least one non-empty group of layers")
    say = log or (lambda _m: None)
    original = measure(model, example_batch, test_loader, latency=latency)
    targets: list[float | None] = [None] * len(groups)
    if budget is not None:
        infos, _ = collect_layer_info(model, take_samples(example_batch, 1), types=COMPRESSIBLE)
        metric = budget.metric
        costs = [
            sum((infos[f].flops if metric == "flops" else infos[f].params) for f in g if f in infos)
            for g in groups
        ]
        targets = list(stage_targets(float(original[metric]), budget.fraction, costs))
    current, previous = model, original
    results: list[dict[str, Any]] = []
    for k, group in enumerate(groups):
        members = set(group)
        stage_budget = None
        target = targets[k]
        if budget is not None and target is not None:
            now = float(previous[budget.metric])
            if now <= target:
                # An earlier stage overshot (the allocator moves in whole rank steps): this
                # stage's target is met already, so its layers stay as they are.
                say(
                    f"stage {k + 1}/{len(groups)}: target already met "
                    f"({now / float(original[budget.metric]):.3f} of the original "
                    f"{budget.metric}), skipped"
                )
                continue
            stage_budget = Budget(**{budget.metric: max(target / now, 1e-6)})
        say(
            f"stage {k + 1}/{len(groups)}: {len(group)} layer(s) "
            f"({', '.join(group[:4])}{'…' if len(group) > 4 else ''})"
            + (
                f", target {target / float(original[budget.metric]):.3f} of the original "
                f"{budget.metric}"
                if budget is not None and target is not None
                else ""
            )
        )

        def in_group(_module: nn.Module, fqn: str, members: set[str] = members) -> bool:
            return fqn in members

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
            filter_fn=in_group,
        )
        previous = result["compressed"]
        result["stage"] = k + 1
        result["layers_in_stage"] = list(group)
        result["target_fraction"] = (
            target / float(original[budget.metric]) if budget is not None and target else None
        )
        # Report budgets relative to the original model; keep the stage's own as stage_budget.
        result["stage_budget"] = result["budget"]
        if result["target_fraction"] is not None:
            result["budget"] = {budget.metric: round(result["target_fraction"], 4)}
        # Fractions relative to the *original* model, not to the previous stage's.
        result["stage_original"] = result["original"]
        result["original"] = original
        result["flops_fraction"] = previous["flops"] / original["flops"]
        result["params_fraction"] = previous["params"] / original["params"]
        if latency and previous.get("latency_ms") and original.get("latency_ms"):
            result["latency_speedup"] = original["latency_ms"] / previous["latency_ms"]
        say(
            f"stage {k + 1}: FLOPs {result['flops_fraction']:.3f} of the original, accuracy "
            f"{previous.get('accuracy', float('nan')):.4f}"
        )
        results.append(result)
    return current, results
