"""Planning stage 1: what one forward pass of an example tells about the model, and which layers
the user selected.

Every module that holds a weight matrix ends up in the plan: the Linear and Conv2d layers a method
may compress, and the other weight holders (embeddings, recurrent and attention modules,
transposed or 1-D convolutions, …) with the reason no method touches them.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tensorslim.analysis.flops import count_flops
from tensorslim.analysis.profile import COMPRESSIBLE, collect_layer_info, count_params
from tensorslim.errors import TensorslimError
from tensorslim.facts import LayerInfo
from tensorslim.inputs import ForwardFn, take_samples
from tensorslim.layers.base import StructuredLayer
from tensorslim.planner.ties import shared_parameters
from tensorslim.planner.weight_reads import watch_weight_reads
from tensorslim.surgery import FilterFn

NEVER_CALLED = (
    "its forward never runs (its parent reads .weight directly, or the example does not reach "
    "it): replacing it would be unsafe"
)
NOT_SELECTED = "not selected"


def weight_read_reason(reader: str) -> str:
    """Why a layer whose weight other code reads directly stays dense."""
    return (
        f"{reader} reads its .weight directly (outside the layer's forward): a structured "
        "layer has no weight, so replacing it would break the model"
    )


@dataclass
class ModelSurvey:
    """Facts about a model from one forward pass on a batch-1 example.

    ``order`` lists the Linear/Conv2d fqns a plan covers, in module order (first names of shared
    modules, nothing inside a structured layer); ``other_weights`` the remaining modules that
    hold a weight matrix; ``infos`` the layers that ran (``never_called`` the ones that did not);
    ``tied`` the modules that hold a parameter another module holds too (see planner.ties).
    """

    example: Any
    modules: dict[str, nn.Module]
    aliases: dict[str, str]  # every name of a module → its first name
    infos: dict[str, LayerInfo]
    never_called: set[str]
    order: list[str]
    other_weights: list[str]
    model_params: int
    model_flops: int
    tied: dict[str, list[str]] = field(default_factory=dict)  # fqn → modules sharing a param
    # fqn → the class of the module that read its .weight outside its forward
    weight_readers: dict[str, str] = field(default_factory=dict)


def survey_model(
    model: nn.Module, example_input: Any, forward_fn: ForwardFn | None = None
) -> ModelSurvey:
    """Run the first sample of ``example_input`` once and gather the model's facts."""
    example = take_samples(example_input, 1)
    watched = {f: m for f, m in model.named_modules() if f and isinstance(m, COMPRESSIBLE)}
    with watch_weight_reads(watched) as weight_readers:
        infos, never_called = collect_layer_info(
            model, example, types=COMPRESSIBLE, forward_fn=forward_fn
        )
    modules = dict(model.named_modules())
    first_name = {id(m): fqn for fqn, m in modules.items()}
    aliases = {
        fqn: first_name[id(m)] for fqn, m in model.named_modules(remove_duplicate=False) if fqn
    }
    covered = set(infos) | never_called
    order = [fqn for fqn in modules if fqn in covered]
    return ModelSurvey(
        example=example,
        modules=modules,
        aliases=aliases,
        infos=infos,
        never_called=never_called,
        order=order,
        other_weights=_other_weight_holders(model),
        model_params=count_params(model),
        model_flops=count_flops(model, example, forward_fn),
        tied=shared_parameters(model),
        weight_readers=weight_readers,
    )


def _other_weight_holders(model: nn.Module) -> list[str]:
    """Modules with a parameter of ≥ 2 dims of their own that are not Linear/Conv2d, outside
    structured layers and parametrizations (their parts are not layers of the model)."""
    found: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if isinstance(child, StructuredLayer) or name == "parametrizations":
                continue
            own = [p for p in child.parameters(recurse=False) if p.dim() >= 2]
            if own and not isinstance(child, COMPRESSIBLE) and fqn not in found:
                found.append(fqn)
            walk(child, fqn)

    walk(model, "")
    return found


def resolve_names(survey: ModelSurvey, names: list[str] | None, what: str) -> set[str] | None:
    """The first names of the modules the user named in ``layers`` / ``exclude``.

    A name the model does not have is an error with the closest names as a hint.
    """
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    resolved = set()
    for name in names:
        if name not in survey.aliases:
            close = difflib.get_close_matches(name, list(survey.aliases), n=3)
            hint = f" — did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise TensorslimError(
                f"{what}: no layer named {name!r} in the model{hint} "
                "(`tensorslim inspect` lists the names)"
            )
        resolved.add(survey.aliases[name])
    return resolved


def is_selected(
    survey: ModelSurvey,
    fqn: str,
    wanted: set[str] | None,
    excluded: set[str] | None,
    filter_fn: FilterFn | None,
) -> bool:
    """Whether the user's ``layers`` / ``exclude`` / ``filter_fn`` choose layer ``fqn``."""
    if wanted is not None and fqn not in wanted:
        return False
    if excluded is not None and fqn in excluded:
        return False
    return filter_fn is None or bool(filter_fn(survey.modules[fqn], fqn))
