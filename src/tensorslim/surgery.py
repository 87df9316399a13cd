"""Model surgery: find submodules and replace them in place, wherever they are referenced.

Works on any ``nn.Module`` tree: nested modules, ``nn.Sequential``, ``nn.ModuleList``,
``nn.ModuleDict``, and modules shared by two parents (every reference is replaced by the same new
module, so the sharing survives). The new module takes the old one's device, dtype and
train/eval mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from tensorslim.errors import TensorslimError

FilterFn = Callable[[nn.Module, str], bool]


def select_modules(
    model: nn.Module,
    *,
    fqns: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] | type[nn.Module] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[tuple[str, nn.Module]]:
    """(fqn, module) pairs chosen by exact names, by type, and/or by ``filter_fn(module, fqn)``.

    All given criteria must hold. Shared modules appear once, under their first name.
    Unknown names in ``fqns`` are a clear error.
    """
    named = dict(model.named_modules())
    if fqns is not None:
        # every name counts here, also the second name of a shared module
        named = dict(model.named_modules(remove_duplicate=False))
        wanted = list(fqns)
        missing = [f for f in wanted if f not in named]
        if missing:
            raise TensorslimError(
                f"no module named {missing[0]!r} in the model (see `tensorslim inspect` for names)"
            )
        items = [(f, named[f]) for f in wanted]
    else:
        items = [(f, m) for f, m in named.items() if f]
    if types is not None:
        items = [(f, m) for f, m in items if isinstance(m, types)]
    if filter_fn is not None:
        items = [(f, m) for f, m in items if filter_fn(m, f)]
    return items


def references(model: nn.Module, target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent, child name) under ``model`` whose child is ``target`` (identity)."""
    found = []
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is target:
                found.append((parent, name))
    return found


def match_state(old: nn.Module, new: nn.Module) -> nn.Module:
    """Move ``new`` to ``old``'s device and floating dtype, and copy its train/eval mode."""
    tensor = next(iter(old.parameters()), None)
    if tensor is None:
        tensor = next(iter(old.buffers()), None)
    if tensor is not None:
        new = new.to(device=tensor.device)
        if torch.is_floating_point(tensor):
            new = new.to(dtype=tensor.dtype)
    new.train(old.training)
    return new


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Replace the module at ``fqn`` (and every other reference to it) with ``new``.

    Returns the old module. ``new`` is moved to the old module's device/dtype/mode.
    """
    if not fqn:
        raise TensorslimError("cannot replace the root module itself; replace its children")
    try:
        old = model.get_submodule(fqn)
    except AttributeError:
        raise TensorslimError(f"no module named {fqn!r} in the model") from None
    new = match_state(old, new)
    for parent, name in references(model, old):
        parent._modules[name] = new
    return old


def replace_modules_at(model: nn.Module, new_modules: dict[str, nn.Module]) -> None:
    """:func:`replace_module` for every ``fqn → new`` of ``new_modules``, in one walk of the
    model (``replace_module`` walks it per module to find every reference: resnet56's 28
    replacements walked its ~340 modules 28 times)."""
    if "" in new_modules:
        raise TensorslimError("cannot replace the root module itself; replace its children")
    by_id: dict[int, nn.Module] = {}
    for fqn, new in new_modules.items():
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise TensorslimError(f"no module named {fqn!r} in the model") from None
        by_id[id(old)] = match_state(old, new)
    # every (parent, name) found first: replacing during the walk would walk the new modules
    found = [
        (parent, name, by_id[id(child)])
        for parent in model.modules()
        for name, child in parent._modules.items()
        if child is not None and id(child) in by_id
    ]
    for parent, name, new in found:
        parent._modules[name] = new


def replace_modules(
    model: nn.Module,
    factory: Callable[[nn.Module, str], nn.Module | None],
    *,
    fqns: Iterable[str] | None = None,
    types: tuple[type[nn.Module], ...] | type[nn.Module] | None = None,
    filter_fn: FilterFn | None = None,
) -> dict[str, nn.Module]:
    """Replace each selected module by ``factory(module, fqn)`` (None: leave it); return the new."""
    replaced = {}
    for fqn, module in select_modules(model, fqns=fqns, types=types, filter_fn=filter_fn):
        new = factory(module, fqn)
        if new is not None:
            replace_module(model, fqn, new)
            replaced[fqn] = new
    return replaced


TensorFn = Callable[[torch.Tensor], torch.Tensor]


def copy_structure(model: nn.Module, convert: TensorFn | None = None) -> nn.Module:
    """A new module tree of ``model``'s structure whose parameters and buffers are ``model``'s
    own tensors (no weight is copied), or ``convert(tensor)`` where that returns a new tensor
    (a dtype or layout change: a new frozen parameter; ``model``'s are never changed).

    Each module is a shallow copy with its own parameter, buffer and child dicts, so replacing
    a child, switching the train/eval mode or converting tensors in the copy leaves ``model``
    as it was; modules shared within ``model`` stay shared in the copy. For running and timing:
    the copy shares ``model``'s storage (an in-place update of a weight shows in both).
    """
    memo: dict[int, nn.Module] = {}

    def tensors(table: dict, parameters: bool) -> dict:
        out = {}
        for name, t in table.items():
            new = convert(t.detach()) if convert is not None and t is not None else None
            if (
                new is None
                or new is t
                or (new.data_ptr() == t.data_ptr() and new.stride() == t.stride())
            ):
                out[name] = t
            else:
                out[name] = nn.Parameter(new, requires_grad=False) if parameters else new
        return out

    def clone(module: nn.Module) -> nn.Module:
        if id(module) not in memo:
            new = copy.copy(module)
            memo[id(module)] = new
            new._parameters = tensors(module._parameters, parameters=True)
            new._buffers = tensors(module._buffers, parameters=False)
            new._modules = {
                k: clone(m) if m is not None else None for k, m in module._modules.items()
            }
        return memo[id(module)]

    return clone(model)
