"""Memory layouts of a model: one for the whole model, or one per chain of layers.

A *layout* maps module fqns to a memory format ("nchw" or "channels_last"): ``{"": f}`` puts
the whole model in f; ``{"layer1": "channels_last", "layer2": "nchw", ...}`` puts each named
*chain* in its own. Putting a module in format f means

- every 4-D parameter and buffer under it (conv weights) is stored in f — oneDNN runs a
  convolution in channels_last when its input *or* its weight is channels_last, so the
  weights decide the layout of the chain's first convolution and everything after it;
- a forward pre-hook (:class:`InputLayout`) converts its 4-D tensor inputs to f — needed where
  an NCHW chain follows a channels_last one (the input alone would keep it channels_last),
  and for the whole model in channels_last, so ops before the first conv run in it too
  (as the timing runner, :func:`tensorslim.analysis.deployment.prepare`, converts the input).

A layout never changes a value, only strides: outputs equal the NCHW model's to float
tolerance, state-dict keys are unchanged, and ``contiguous(memory_format=...)`` is an identity
in ONNX. safetensors writes contiguous copies (``save_model(force_contiguous=True)``) and
``load`` copies the read weights into the rebuilt model's tensors, which keep their layout.

Chains (:func:`find_chains`): the children of the shallowest module with two or more children
that hold a 4-D parameter — a ResNet's stem conv and its stages ``layer1``..``layer4``, a
VGG's convolutions. A chain boundary is where a layout change (a copy) can happen; whether it
pays is decided by timing the whole model (:mod:`tensorslim.planner.layout_chains`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.deployment import AUTO, Deployment
from tensorslim.errors import TensorslimError
from tensorslim.surgery import copy_structure

MEMORY_FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
WHOLE = ""  # the layout key of the whole model

Layout = dict[str, str]


def _has_4d(module: nn.Module) -> bool:
    return any(p.dim() == 4 for p in module.parameters())


def find_chains(model: nn.Module) -> list[str]:
    """The fqns of ``model``'s chains, in registration order (see the module docstring).

    Descends while exactly one child holds a 4-D parameter (a ``features`` wrapper); a model
    with fewer than two such children below that has one chain at most (an empty or single
    list: nothing to mix).
    """
    root, prefix = model, ""
    while True:
        holders = [(n, c) for n, c in root.named_children() if _has_4d(c)]
        if len(holders) == 1 and next(holders[0][1].children(), None) is not None:
            root, prefix = holders[0][1], f"{prefix}{holders[0][0]}."
            continue
        return [prefix + n for n, _ in holders]


@dataclass(frozen=True)
class InputLayout:
    """Forward pre-hook: the module's 4-D floating tensor arguments in ``memory_format``
    (a copy only where the strides differ). A class, not a closure: models stay picklable
    and deep-copyable."""

    memory_format: str

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        fmt = MEMORY_FORMATS[self.memory_format]
        return tuple(
            a.contiguous(memory_format=fmt)
            if isinstance(a, torch.Tensor) and a.dim() == 4 and a.is_floating_point()
            else a
            for a in args
        )


def check_layout(layout: Layout) -> None:
    """A one-line error for a layout naming an unknown format."""
    for fqn, fmt in layout.items():
        if fmt not in MEMORY_FORMATS:
            allowed = ", ".join(MEMORY_FORMATS)
            raise TensorslimError(f"layout of {fqn or 'the model'!r} is {fmt!r}: use {allowed}")


def to_layout(model: nn.Module, layout: Layout, *, inplace: bool = True) -> nn.Module:
    """``model`` with each module of ``layout`` in its format (see the module docstring).

    ``inplace=True`` converts ``model``'s own tensors (``p.data`` is replaced, so a weight
    shared by two modules stays shared); ``inplace=False`` converts a
    :func:`~tensorslim.surgery.copy_structure` copy (for timing: ``model`` is left as it was).
    A whole-model NCHW layout adds no hook (NCHW is PyTorch's default); the input hooks of an
    earlier layout are removed first, so a later stage's layout replaces it.
    """
    check_layout(layout)
    target = model if inplace else copy_structure(model)
    for module in target.modules():  # a new layout replaces an earlier one (another stage's)
        if layout_of(module) is not None:
            _drop_input_layout(module)
    for fqn, fmt in layout.items():
        try:
            module = target.get_submodule(fqn) if fqn else target
        except AttributeError:
            raise TensorslimError(
                f"layout names {fqn!r}, which the model does not have (another architecture?)"
            ) from None
        _convert_tensors(module, MEMORY_FORMATS[fmt], inplace)
        if fqn != WHOLE or fmt != "nchw":
            _set_input_layout(module, fmt)
    return target


def _convert_tensors(module: nn.Module, fmt: torch.memory_format, inplace: bool) -> None:
    """Every 4-D parameter and buffer under ``module`` stored in ``fmt``."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is None or p.dim() != 4 or p.is_contiguous(memory_format=fmt):
                continue
            new = p.detach().contiguous(memory_format=fmt)
            if inplace:
                p.data = new
            else:  # the copy's own parameter dict: the original's tensor is untouched
                sub._parameters[name] = nn.Parameter(new, requires_grad=p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None and b.dim() == 4 and not b.is_contiguous(memory_format=fmt):
                sub._buffers[name] = b.contiguous(memory_format=fmt)


def _set_input_layout(module: nn.Module, fmt: str) -> None:
    """One :class:`InputLayout` pre-hook on ``module`` (an earlier one replaced)."""
    _drop_input_layout(module)
    module.register_forward_pre_hook(InputLayout(fmt))


def _drop_input_layout(module: nn.Module) -> None:
    """``module`` without :class:`InputLayout` hooks. The hook table is rebuilt rather than
    edited: a ``copy_structure`` copy shares its original's table, which must keep its own."""
    module._forward_pre_hooks = OrderedDict(
        (k, h) for k, h in module._forward_pre_hooks.items() if not isinstance(h, InputLayout)
    )


def layout_of(module: nn.Module) -> str | None:
    """The format ``module``'s input hook converts to (``None`` without one)."""
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, InputLayout)]
    return hooks[-1].memory_format if hooks else None


def planned_layout(latency: dict[str, Any] | None) -> Layout | None:
    """The layout a plan's latency record measured, for ``apply``: the per-chain assignment
    when the plan kept one, else the deployment's format; ``None`` when the plan timed nothing,
    or on ONNX Runtime (which picks its own layouts)."""
    if not latency:
        return None
    deployment = latency.get("deployment", {})
    if deployment.get("backend", "eager") != "eager":
        return None
    chains = latency.get("memory_format", {}).get("chains") or {}
    if chains.get("kept"):
        return dict(chains["assignment"])
    fmt = deployment.get("memory_format")
    return {WHOLE: fmt} if fmt in MEMORY_FORMATS else None


def is_per_chain(latency: dict[str, Any] | None) -> bool:
    """Whether the plan's layout differs between chains (then a runner must leave the applied
    model's tensors as they are: ``memory_format="auto"``)."""
    layout = planned_layout(latency)
    return layout is not None and WHOLE not in layout


def applied_deployment(latency: dict[str, Any]) -> Deployment:
    """The deployment to time the model ``apply`` returned for a plan with this latency record
    in: the record's, but memory format "auto" (tensors as they are, hooks converting) when
    the layout is per chain — the record's single format would undo the mix."""
    where = Deployment(**latency["deployment"])
    return where.in_format(AUTO) if is_per_chain(latency) else where
