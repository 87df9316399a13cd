"""Layers that compute a Linear map y = W x + b but do not subclass ``nn.Linear``.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT, GPT-2 and their descendants) stores its
weight transposed, as (in, out), and computes y = x · weight + bias. This module is the one place
that knows it: the planner's survey, the FLOP counter, calibration and every method see such a
layer through these functions, and methods receive it as an ``nn.Linear`` (``as_linear``), so no
method carries a special case.

transformers is never imported here: a ``Conv1D`` can only exist once transformers' module is
loaded, so the class is looked up in ``sys.modules`` (an optional extra, ``.[hf]``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

_HF_MODULE = "transformers.pytorch_utils"


def _hf_conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class if transformers is loaded, else ``None``."""
    module = sys.modules.get(_HF_MODULE)
    return getattr(module, "Conv1D", None) if module is not None else None


def is_transposed_linear(module: Any) -> bool:
    """Whether ``module`` is a transformers ``Conv1D`` (a Linear with weight stored (in, out))."""
    conv1d = _hf_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: Any) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a layer computing the same map (``Conv1D``)."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


class _LinearLikeMeta(type):
    # isinstance(m, LinearLike) asks is_linear_like: a virtual type with no state of its own
    def __instancecheck__(cls, instance: Any) -> bool:
        return is_linear_like(instance)

    def __subclasscheck__(cls, subclass: type) -> bool:
        conv1d = _hf_conv1d_type()
        return issubclass(subclass, nn.Linear) or (
            conv1d is not None and issubclass(subclass, conv1d)
        )


class LinearLike(metaclass=_LinearLikeMeta):
    """Virtual type for ``isinstance`` checks: ``nn.Linear`` and transformers' ``Conv1D``."""


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as the (out, in) matrix W of y = W x + b (a view, no copy)."""
    if is_transposed_linear(module):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a Linear-like layer")


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias b (out,) of a Linear-like layer, or ``None``."""
    return getattr(module, "bias", None)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like layer."""
    out_features, in_features = linear_weight(module).shape
    return int(in_features), int(out_features)


def as_linear(module: nn.Module, copy: bool = True) -> nn.Module:
    """``module`` as an ``nn.Linear`` computing the same map when it is Linear-like, else itself.

    A ``Conv1D`` becomes a new ``nn.Linear`` whose bias is the same parameter and whose weight
    is the transposed weight (same ``requires_grad``), so y = linear(x) equals conv1d(x) exactly:
    with ``copy`` a contiguous (out, in) copy (for a layer that may end up in a model, be saved
    or trained), without it a transposed view sharing the Conv1D's storage and version counter
    (for reading the weight while planning: no memory, and an in-place change of the original
    shows in the view). ``nn.Linear`` (and every other module) is returned unchanged, so calling
    this twice is harmless.
    """
    if not is_transposed_linear(module):
        return module
    weight = module.weight
    in_features, out_features = linear_features(module)
    bias = linear_bias(module)
    linear = nn.Linear(
        in_features, out_features, bias=bias is not None, device="meta", dtype=weight.dtype
    )
    transposed = weight.detach().t()
    linear.weight = nn.Parameter(
        transposed.contiguous() if copy else transposed, requires_grad=weight.requires_grad
    )
    if bias is not None:
        linear.bias = bias
    linear.train(module.training)
    return linear


def as_conv1d(linear: nn.Linear) -> nn.Module:
    """The transformers ``Conv1D`` computing the same map as ``linear`` (the inverse of
    :func:`as_linear`): its weight a contiguous (in, out) copy of W, its bias the same parameter.

    For a method that trained a Conv1D as a Linear and bakes it back (pruning's finalize), so the
    model keeps the layer type — and the state-dict layout — of the model it came from.
    """
    conv1d = _hf_conv1d_type()
    if conv1d is None:
        raise TypeError("transformers is not loaded: there is no Conv1D to convert to")
    layer = conv1d(linear.out_features, linear.in_features)
    weight = linear.weight
    layer.weight = nn.Parameter(
        weight.detach().t().contiguous(), requires_grad=weight.requires_grad
    )
    if linear.bias is not None:
        layer.bias = linear.bias
    else:  # Conv1D always has a bias; a Linear without one computes x·W + 0
        layer.bias = nn.Parameter(torch.zeros_like(layer.bias), requires_grad=False)
    layer.train(linear.training)
    return layer
