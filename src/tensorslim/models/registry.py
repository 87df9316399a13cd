"""Model registry: ``@register_model``, :func:`create_model` and :func:`list_models`.

Names resolve in this order: a registered zoo name (``lenet5``, ``resnet20``, ...), then
``hf:PATH`` (a local Hugging Face model directory, offline), then ``torchvision:NAME``, then the
user's own ``module:function`` builder.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.models.external import (
    build_torchvision_model,
    build_user_model,
    is_external_spec,
)
from tensorslim.models.huggingface import hf_path, load_hf_model

__all__ = ["create_model", "list_models", "register_model"]

ModelBuilder = Callable[..., nn.Module]
B = TypeVar("B", bound=ModelBuilder)

_REGISTRY: dict[str, ModelBuilder] = {}


def _add(name: str, builder: ModelBuilder) -> None:
    """Register ``builder`` under ``name``; the same function may be registered again."""
    if not name or ":" in name or name != name.strip():
        raise TensorslimError(
            f"model name {name!r} is invalid; use a non-empty name without ':' or spaces"
        )
    old = _REGISTRY.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (
        builder.__module__,
        builder.__qualname__,
    ):
        raise TensorslimError(
            f"model name {name!r} is already registered by {old.__module__}.{old.__qualname__}; "
            "pick another name"
        )
    _REGISTRY[name] = builder


@overload
def register_model(name_or_fn: B) -> B: ...


@overload
def register_model(name_or_fn: str | None = None) -> Callable[[B], B]: ...


def register_model(name_or_fn: str | B | None = None) -> B | Callable[[B], B]:
    """Register a model builder, as ``@register_model`` or ``@register_model("name")``.

    Without a name the function's ``__name__`` is used. Builders take ``in_channels: int = 1``
    and ``num_classes: int = 10`` (plus their own keyword arguments) and return an
    ``nn.Module`` mapping ``(N, in_channels, H, W)`` to ``(N, num_classes)`` logits.
    """
    if callable(name_or_fn):
        fn = name_or_fn
        _add(fn.__name__, fn)
        return fn

    def decorator(fn: B) -> B:
        _add(name_or_fn if name_or_fn is not None else fn.__name__, fn)
        return fn

    return decorator


def list_models() -> list[str]:
    """Names of the registered zoo models, sorted (``torchvision:``/``module:`` not included)."""
    return sorted(_REGISTRY)


def _accepted_kwargs(builder: ModelBuilder) -> tuple[list[str], bool]:
    """Keyword names a builder accepts, and whether it takes ``**kwargs`` (or is opaque)."""
    try:
        params = list(inspect.signature(builder).parameters.values())
    except (TypeError, ValueError):
        return [], True
    names = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with fresh parameters drawn from torch's RNG (seed it first).

    Args:
        name: a zoo name from :func:`list_models`, ``torchvision:NAME`` or ``module:function``.
        **kwargs: builder arguments, typically ``in_channels`` and ``num_classes``.

    Returns:
        An ``nn.Module`` in training mode mapping ``(N, in_channels, H, W)`` to
        ``(N, num_classes)``.

    Raises:
        TensorslimError: unknown name, bad arguments or a failing external builder.
    """
    key = name.strip()
    builder = _REGISTRY.get(key) or _REGISTRY.get(key.lower())
    if builder is not None:
        accepted, has_var_kw = _accepted_kwargs(builder)
        unknown = [k for k in kwargs if k not in accepted]
        if unknown and not has_var_kw:
            raise TensorslimError(
                f"model {key!r} does not accept {', '.join(sorted(unknown))}; "
                f"it accepts {', '.join(accepted) or 'no arguments'}"
            )
        try:
            return builder(**kwargs)
        except TensorslimError:
            raise
        except (TypeError, ValueError) as exc:
            raise TensorslimError(
                f"model {key!r} cannot be built with {kwargs} ({exc}); fix the arguments"
            ) from exc
    directory = hf_path(key)
    if directory is not None:
        # a pretrained model keeps its own architecture: the zoo's shape arguments do not apply
        other = sorted(set(kwargs) - {"in_channels", "num_classes"})
        if other:
            raise TensorslimError(f"model {key!r} takes no arguments (got {', '.join(other)})")
        return load_hf_model(directory)
    if key.startswith("torchvision:"):
        tv_name = key.split(":", 1)[1].strip()
        if not tv_name:
            raise TensorslimError(
                "model 'torchvision:' has no model name; write e.g. 'torchvision:resnet18'"
            )
        return build_torchvision_model(tv_name, **kwargs)
    if is_external_spec(key):
        return build_user_model(key, **kwargs)
    known = list_models()
    close = difflib.get_close_matches(key.lower(), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise TensorslimError(
        f"unknown model {name!r}; {hint}known models: {', '.join(known)} "
        "(or 'torchvision:NAME', or 'module:function' for your own builder)"
    )
