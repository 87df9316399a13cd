"""Planning stage 3: each selected layer's options from the method (errors in output space when
calibration statistics are there), or the reason the layer stays dense."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from tensorslim.errors import TensorslimError
from tensorslim.facts import OUTPUT_ERROR, WEIGHT_ERROR, LayerStats
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.composite import composite_matrices, is_composite
from tensorslim.methods.base import Method
from tensorslim.planner.survey import ModelSurvey
from tensorslim.rank.allocate import LayerChoices


@dataclass
class Candidates:
    """The options of every layer a method can work on, and why the others stay dense."""

    choices: list[LayerChoices] = field(default_factory=list)
    dense_reasons: dict[str, str] = field(default_factory=dict)
    error_space: str = WEIGHT_ERROR
    # layers whose options kept weight-space errors in an output-space plan (no input Gram)
    weight_space_layers: list[str] = field(default_factory=list)


def gather_candidates(
    method: Method,
    survey: ModelSurvey,
    selected: list[str],
    stats: dict[str, LayerStats] | None,
    cost_metric: str,
    progress: bool = False,
) -> Candidates:
    """Ask ``method`` for options on every selected layer (``cost_metric`` prices them).

    With an input Gram in ``stats`` the options' errors are measured in output space, so the
    allocator spends the budget where the data says the error matters. ``progress`` shows a bar
    per layer on stderr (only when stderr is a terminal).
    """
    found = Candidates(
        error_space=OUTPUT_ERROR if _measures_output(method, stats) else WEIGHT_ERROR
    )
    bar = tqdm(
        selected,
        desc=f"plan {method.name}",
        unit="layer",
        leave=False,
        file=sys.stderr,
        disable=None if progress else True,  # None: tqdm stays quiet when stderr is no TTY
    )
    for fqn in bar:
        bar.set_postfix_str(fqn[-40:], refresh=False)
        module, info = survey.modules[fqn], survey.infos[fqn]
        reason = _unsupported_reason(method, module, fqn)
        if reason is not None:
            found.dense_reasons[fqn] = reason
            continue
        layer_stats = stats.get(fqn) if stats else None
        # without statistics, call as methods written before calibration existed expect
        options = (
            method.candidates(module, info)
            if layer_stats is None
            else method.candidates(module, info, layer_stats)
        )
        if found.error_space == OUTPUT_ERROR and options and layer_stats is not None:
            options = method.output_errors(module, info, options, layer_stats)
        elif found.error_space == OUTPUT_ERROR and options:
            found.weight_space_layers.append(fqn)
        if not options:
            found.dense_reasons[fqn] = f"{method.name} offers no option for this layer"
            continue
        dense = {"flops": info.flops, "params": info.params}
        found.choices.append(LayerChoices(fqn, dense[cost_metric], options, dense))
    return found


def _measures_output(method: Method, stats: dict[str, LayerStats] | None) -> bool:
    """Output-space errors for decomposition methods whenever calibration gave input Grams."""
    if method.kind == "training" or not stats:
        return False
    return all(s.gram is not None for s in stats.values())


def _unsupported_reason(method: Method, module: nn.Module, fqn: str) -> str | None:
    if isinstance(module, StructuredLayer) or getattr(module, "parametrizations", None):
        return "already structured"
    check_finite_weight(module, fqn)
    return method.supports(module, fqn)


def check_finite_weight(module: nn.Module, fqn: str) -> None:
    """A clear error naming the layer when its weight (or, for an attention or recurrent layer,
    one of its weight matrices) holds NaN or Inf."""
    weight = getattr(module, "weight", None)
    matrices = composite_matrices(module) if is_composite(module) else [weight]
    bad = sum(
        int((~torch.isfinite(w.detach())).sum()) for w in matrices if isinstance(w, torch.Tensor)
    )
    if bad:
        raise TensorslimError(
            f"layer {fqn}: its weight holds {bad} NaN/Inf value(s); a decomposition of it is "
            "meaningless — fix the checkpoint (or exclude the layer)"
        )
