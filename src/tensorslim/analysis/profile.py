"""Per-layer facts from one forward pass: input/output shapes, parameters, FLOPs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tensorslim.analysis.flops import dense_layer_flops, fused_paths_disabled, leading_shape
from tensorslim.facts import LayerInfo
from tensorslim.inputs import ForwardFn, call_model
from tensorslim.layers.base import StructuredLayer
from tensorslim.layers.linear_like import LinearLike

# Linear-like layers (nn.Linear, transformers' Conv1D), Conv1d and Conv2d: the layer types a plan
# covers one by one; every method says for each whether it compresses it or why not
COMPRESSIBLE = (LinearLike, nn.Conv1d, nn.Conv2d, nn.RNNBase, nn.MultiheadAttention)
# layers whose sub-modules are parts of them, not layers of their own (the attention's
# out_proj is read by its parent's forward, never called)
WHOLE = (StructuredLayer, nn.MultiheadAttention)


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


def collect_layer_info(
    model: nn.Module,
    example_input: Any,
    types: tuple[type[nn.Module], ...] = (*COMPRESSIBLE, StructuredLayer),
    names: Iterable[tuple[str, nn.Module]] | None = None,
    forward_fn: ForwardFn | None = None,
) -> tuple[dict[str, LayerInfo], set[str]]:
    """Run ``example_input`` once and record every matching layer's shapes and cost.

    ``example_input`` takes any structure :mod:`tensorslim.inputs` accepts (or goes to
    ``forward_fn(model, example_input)``).

    Returns (info by fqn, fqns of matching layers whose forward never ran — e.g. a layer whose
    parent reads ``.weight`` directly). Structured layers and attention modules (whose
    ``out_proj`` is such a layer) are not descended into; torch's fused attention and encoder
    paths are switched off for the pass, so their sub-layers run.
    """
    chosen = list(names) if names is not None else _top_level_layers(model, types)
    seen = _record_calls(model, [m for _, m in chosen], example_input, forward_fn)
    infos: dict[str, LayerInfo] = {}
    never_called: set[str] = set()
    done: set[int] = set()
    for fqn, module in chosen:
        if id(module) in done:
            continue
        done.add(id(module))
        calls = seen.get(id(module))
        if not calls:
            never_called.add(fqn)
            continue
        in_shape, out_shape, others = calls[0]
        infos[fqn] = LayerInfo(
            fqn=fqn,
            type_name=type(module).__name__,
            input_shape=in_shape,
            output_shape=out_shape,
            params=count_params(module),
            flops=sum(dense_layer_flops(module, shape, more) for shape, _, more in calls),
            calls=len(calls),
            other_shapes=others,
        )
    return infos, never_called


_Shape = tuple[int, ...]
_Call = tuple[_Shape, _Shape, tuple[_Shape, ...]]


def _record_calls(
    model: nn.Module, modules: list[nn.Module], example_input: Any, forward_fn: ForwardFn | None
) -> dict[int, list[_Call]]:
    """The shapes of every call of ``modules`` (by id) in one eval forward pass."""
    seen: dict[int, list[_Call]] = {}

    def make_hook(key: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            call = _call_shapes(args, kwargs, output)
            if call is not None:
                seen.setdefault(key, []).append(call)

        return hook

    unique = {id(m): m for m in modules}
    handles = [
        module.register_forward_hook(make_hook(key), with_kwargs=True)
        for key, module in unique.items()
    ]
    was_training = model.training
    model.eval()
    try:
        # unfused paths, so the sub-layers of attention and encoder layers run (and are seen)
        with torch.no_grad(), fused_paths_disabled():
            call_model(model, example_input, forward_fn)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen


def _call_shapes(args: tuple, kwargs: dict, output: Any) -> _Call | None:
    """(first input, first output, further tensor inputs) shapes of one call, or None when the
    call took no tensor-like first input. Attention's key and value may come by keyword."""
    inputs = list(args) or [kwargs.get("query", kwargs.get("input"))]
    first, out = leading_shape(inputs[0]), leading_shape(output)
    if first is None or out is None:
        return None
    more = [*inputs[1:3], *(kwargs.get(k) for k in ("key", "value"))]
    others = tuple(tuple(t.shape) for t in more if isinstance(t, torch.Tensor))
    return first, out, others


def _top_level_layers(
    model: nn.Module, types: tuple[type[nn.Module], ...]
) -> list[tuple[str, nn.Module]]:
    """Matching modules, not descending into structured layers (their parts are not layers)."""
    found: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            fqn = f"{prefix}.{name}" if prefix else name
            if isinstance(child, types):
                found.append((fqn, child))
            if not isinstance(child, WHOLE):
                walk(child, fqn)

    walk(model, "")
    return found
