"""Model inputs of any structure: the one place that moves, slices, counts and calls them.

A model may take one tensor, several positional tensors, keyword tensors (a tokenizer's
``BatchEncoding`` or any mapping), or a mix. tensorslim accepts, wherever it runs a model
(planning, calibration, FLOPs, latency, ``fit``, ``evaluate``):

- an **example input** (what ``plan(example_input=...)`` takes): a tensor → ``model(t)``; a tuple
  or list → ``model(*items)``; a mapping → ``model(**mapping)``; an :class:`Inputs` →
  ``model(*args, **kwargs)``;
- a **loader batch** (what a DataLoader yields): a tuple or list is ``(inputs, targets, ...)``
  whose first item is an example input as above; a mapping is keyword inputs (its ``labels``
  key, if any, doubles as the targets); a tensor is an unlabeled input; an :class:`Inputs` is
  itself.

Anything else goes through a ``forward_fn(model, batch)`` the caller supplies. Nothing else in
tensorslim indexes inputs by hand.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tensorslim.errors import TensorslimError

ForwardFn = Callable[[nn.Module, Any], Any]
TARGET_KEYS = ("labels", "label", "targets", "target")


@dataclass
class Inputs:
    """Positional and keyword arguments of one model call."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def as_inputs(example: Any) -> Inputs:
    """The call arguments an example input stands for (see the module docstring)."""
    if isinstance(example, Inputs):
        return example
    if isinstance(example, torch.Tensor):
        return Inputs((example,))
    if isinstance(example, tuple | list):
        return Inputs(tuple(example))
    if isinstance(example, Mapping):
        return Inputs((), dict(example))
    raise TensorslimError(
        f"cannot call a model with an input of type {type(example).__name__}: give a tensor, a "
        "tuple of tensors, a mapping of keyword tensors, tensorslim.Inputs, or a forward_fn"
    )


def batch_inputs(batch: Any) -> Inputs:
    """The call arguments in one loader batch (a tuple's first item; a mapping as keywords)."""
    if isinstance(batch, tuple | list):
        if not batch:
            raise TensorslimError("a loader yielded an empty batch")
        return as_inputs(batch[0])
    return as_inputs(batch)


def batch_targets(batch: Any) -> Any:
    """The targets of a loader batch: a tuple's second item, or a mapping's ``labels`` key."""
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in TARGET_KEYS:
            if key in batch:
                return batch[key]
    raise TensorslimError(
        "this batch has no targets (a loader batch is (inputs, targets) or a mapping with "
        "'labels'): pass loss_fn / metric_fn for unlabeled data, or distill from a teacher"
    )


def call_model(model: nn.Module, example: Any, forward_fn: ForwardFn | None = None) -> Any:
    """``forward_fn(model, example)`` if given, else the model called on the example input."""
    if forward_fn is not None:
        return forward_fn(model, example)
    return as_inputs(example).call(model)


def call_on_batch(model: nn.Module, batch: Any, forward_fn: ForwardFn | None = None) -> Any:
    """``forward_fn(model, batch)`` if given, else the model called on the batch's inputs."""
    if forward_fn is not None:
        return forward_fn(model, batch)
    return batch_inputs(batch).call(model)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside it (tuples, lists, mappings, Inputs).

    Mappings come back as plain dicts (a ``BatchEncoding`` is a mapping of tensors too), other
    leaves (ints, strings, None) unchanged.
    """
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Inputs):
        return Inputs(map_tensors(obj.args, fn), map_tensors(obj.kwargs, fn))
    if isinstance(obj, tuple | list):
        return type(obj)(map_tensors(item, fn) for item in obj)
    if isinstance(obj, Mapping):
        return {key: map_tensors(value, fn) for key, value in obj.items()}
    return obj


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside ``obj``, in traversal order."""
    found: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        found.append(tensor)
        return tensor

    map_tensors(obj, keep)
    return found


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor moved to ``device``."""
    return map_tensors(obj, lambda t: t.to(device))


def batch_size(obj: Any) -> int:
    """Size of dimension 0 of the first tensor (with a dimension) inside ``obj``."""
    for tensor in tensors_in(obj):
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    raise TensorslimError(
        f"found no batched tensor in the input ({type(obj).__name__}): cannot tell the batch size"
    )


def take_samples(obj: Any, count: int) -> Any:
    """The first ``count`` samples: every tensor with a dimension sliced on dimension 0."""
    return map_tensors(obj, lambda t: t[:count] if t.dim() > 0 else t)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def output_tensor(output: Any, what: str = "logits") -> torch.Tensor:
    """The main tensor of a model output: itself, ``output.logits`` (or ``last_hidden_state``
    for ``what="hidden"``), a mapping's same key, or a tuple's first item."""
    keys = ("logits",) if what == "logits" else ("last_hidden_state", "hidden_states")
    if isinstance(output, torch.Tensor):
        return output
    for key in keys:
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        first = next(iter(dataclasses.asdict(output).values()), None)
        if isinstance(first, torch.Tensor):
            return first
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TensorslimError(
        f"cannot find the {what} tensor in a model output of type {type(output).__name__}: pass "
        "loss_fn / metric_fn that read it"
    )


def describe(example: Any) -> Any:
    """A JSON-ready description of an input's structure, shapes and dtypes (no values).

    Tensor → ``{"tensor": shape, "dtype": "float32"}``; tuple/list → ``{"tuple": [...]}``;
    mapping → ``{"dict": {...}}``; :class:`Inputs` → ``{"args": [...], "kwargs": {...}}``; a
    JSON scalar → ``{"value": v}``. :func:`zeros_from` rebuilds a zero input from it.
    """
    if isinstance(example, torch.Tensor):
        return {"tensor": list(example.shape), "dtype": str(example.dtype).removeprefix("torch.")}
    if isinstance(example, Inputs):
        return {"args": [describe(a) for a in example.args], "kwargs": describe(example.kwargs)}
    if isinstance(example, tuple | list):
        return {"tuple": [describe(item) for item in example]}
    if isinstance(example, Mapping):
        return {"dict": {str(k): describe(v) for k, v in example.items()}}
    if example is None or isinstance(example, bool | int | float | str):
        return {"value": example}
    raise TensorslimError(f"cannot describe an input of type {type(example).__name__}")


def zeros_from(spec: Any, device: torch.device | str = "cpu") -> Any:
    """A zero input with the structure, shapes and dtypes :func:`describe` recorded."""
    if not isinstance(spec, Mapping):
        raise TensorslimError(f"not an input description: {spec!r}")
    if "tensor" in spec:
        dtype = getattr(torch, str(spec.get("dtype", "float32")), None)
        if not isinstance(dtype, torch.dtype):
            raise TensorslimError(f"unknown dtype {spec.get('dtype')!r} in an input description")
        return torch.zeros([int(n) for n in spec["tensor"]], dtype=dtype, device=device)
    if "args" in spec:
        kwargs = zeros_from(spec["kwargs"], device)
        return Inputs(tuple(zeros_from(a, device) for a in spec["args"]), kwargs)
    if "tuple" in spec:
        return tuple(zeros_from(item, device) for item in spec["tuple"])
    if "dict" in spec:
        return {key: zeros_from(value, device) for key, value in spec["dict"].items()}
    if "value" in spec:
        return spec["value"]
    raise TensorslimError(f"not an input description: {spec!r}")


def first_tensor_shape(example: Any) -> list[int]:
    """The shape of the first tensor in ``example`` (the plan's ``input_shape``)."""
    found = tensors_in(example)
    return list(found[0].shape) if found else []
