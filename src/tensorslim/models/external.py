"""Models (and helpers) that come from outside the built-in zoo.

* ``torchvision:NAME`` builds ``torchvision.models.get_model(NAME, weights=None, ...)``.
* ``module:function`` imports the user's own code and calls the builder it names.

The generic helpers :func:`import_callable` and :func:`call_with_accepted_kwargs` are also used
by :mod:`tensorslim.data` for ``module:function`` dataset loaders.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from tensorslim.errors import TensorslimError

__all__ = [
    "build_torchvision_model",
    "build_user_model",
    "call_with_accepted_kwargs",
    "import_callable",
    "is_external_spec",
    "is_user_code",
]


def is_external_spec(name: str) -> bool:
    """Return True when ``name`` looks like ``module:function`` (or ``torchvision:NAME``)."""
    module, sep, attr = name.rpartition(":")
    return bool(sep and module.strip() and attr.strip())


def is_user_code(name: str) -> bool:
    """True when building ``name`` would import the user's Python code (``module:function``).

    Zoo names and ``torchvision:NAME`` run only installed library code; anything else of the
    form ``module:function`` (a dotted module or a ``.py`` file) executes that module.
    """
    name = name.strip()
    return is_external_spec(name) and not name.startswith(("torchvision:", "hf:"))


def _import_module_from_spec(module_name: str) -> ModuleType:
    """Import ``module_name``: a dotted module path or a ``.py`` file path relative to the cwd."""
    importlib.invalidate_caches()
    looks_like_file = module_name.endswith(".py") or "/" in module_name or os.sep in module_name
    if looks_like_file:
        path = Path(module_name).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        unique = f"_tensorslim_user_{path.stem}_{abs(hash(str(path))):x}"
        if unique in sys.modules:
            return sys.modules[unique]
        spec = importlib.util.spec_from_file_location(unique, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(unique, None)
            raise
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """Resolve ``"module:function"`` to the callable it names.

    Args:
        spec: ``package.module:function`` or ``path/to/file.py:function``; the module may be
            importable from the current working directory. ``function`` may be dotted
            (``Class.method``).
        what: what the callable is for (e.g. ``"dataset loader"``), used in error messages.

    Raises:
        TensorslimError: the module cannot be imported, the attribute is missing or it is not
            callable.
    """
    module_name, sep, attr_path = spec.rpartition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not sep or not module_name or not attr_path:
        raise TensorslimError(
            f"{what} {spec!r} is not of the form 'module:function'; "
            "write e.g. 'my_pkg.my_module:build'"
        )
    try:
        module = _import_module_from_spec(module_name)
    except Exception as exc:
        raise TensorslimError(
            f"cannot import module {module_name!r} for {what} '{module_name}:{attr_path}' "
            f"({type(exc).__name__}: {exc}); check the module path and that it is importable "
            "from the current directory"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise TensorslimError(
                f"module {module_name!r} has no function {attr_path!r} for {what} "
                f"'{module_name}:{attr_path}'; check the function name"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise TensorslimError(
            f"{what} '{module_name}:{attr_path}' is a {type(obj).__name__}, not a function; "
            "point it at a callable"
        )
    return obj


def call_with_accepted_kwargs(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with only those of ``kwargs`` that its signature accepts.

    A function with ``**kwargs`` receives everything; one whose signature cannot be inspected
    (some builtins) also receives everything.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn(**kwargs)
    accepted = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    """Swap the model's first ``nn.Conv2d`` for one reading ``in_channels`` channels.

    The replacement keeps every other setting (kernel, stride, padding, bias, groups) and is
    initialised by torch's default initialiser.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                if child.groups != 1:
                    raise TensorslimError(
                        f"cannot adapt the first conv '{child_name}' (groups={child.groups}) "
                        f"to in_channels={in_channels}; use 3-channel inputs for this model"
                    )
                new = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,  # type: ignore[arg-type]
                    stride=child.stride,  # type: ignore[arg-type]
                    padding=child.padding,  # type: ignore[arg-type]
                    dilation=child.dilation,  # type: ignore[arg-type]
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, child_name, new)
                return
    raise TensorslimError(
        f"model has no nn.Conv2d to adapt to in_channels={in_channels}; "
        "use 3-channel inputs for this model"
    )


def build_torchvision_model(
    name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any
) -> nn.Module:
    """Build an untrained torchvision model ``name`` (e.g. ``"resnet18"``).

    ``weights=None`` always (no downloads). When ``in_channels != 3`` the first ``nn.Conv2d`` is
    replaced by one that reads ``in_channels`` channels. Input ``(N, in_channels, H, W)``,
    output ``(N, num_classes)``; the minimum ``H, W`` depend on the architecture.

    Raises:
        TensorslimError: torchvision is not installed or does not know ``name``.
    """
    try:
        import torchvision  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TensorslimError(
            f"model 'torchvision:{name}' needs torchvision; install the `vision` extra "
            "(pip install tensorslim[vision])"
        ) from exc
    kwargs.pop("weights", None)
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except Exception as exc:
        raise TensorslimError(
            f"torchvision cannot build model {name!r} ({type(exc).__name__}: {exc}); "
            "see torchvision.models.list_models() for valid names"
        ) from exc
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def build_user_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model with the user's ``module:function`` builder.

    The builder is called with those of ``kwargs`` (``in_channels``, ``num_classes``, ...) that
    its signature accepts, and must return an ``nn.Module``.

    Raises:
        TensorslimError: import failure, the builder raising, or a non-module result.
    """
    fn = import_callable(spec, "model builder")
    try:
        model = call_with_accepted_kwargs(fn, **kwargs)
    except TensorslimError:
        raise
    except Exception as exc:
        raise TensorslimError(
            f"model builder {spec!r} failed ({type(exc).__name__}: {exc}); fix the builder or "
            "its arguments"
        ) from exc
    if not isinstance(model, nn.Module):
        raise TensorslimError(
            f"model builder {spec!r} returned {type(model).__name__}, not a torch.nn.Module; "
            "make it return the model"
        )
    return model
