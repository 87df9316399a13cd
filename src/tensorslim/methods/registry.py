"""Registry of compression methods by name."""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any

from tensorslim.errors import TensorslimError
from tensorslim.methods.presets import resolve_settings

if TYPE_CHECKING:
    from tensorslim.methods.base import Method

_METHODS: dict[str, type[Method]] = {}


def _register(cls: type[Method]) -> None:
    existing = _METHODS.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise RuntimeError(f"method name '{cls.name}' registered twice ({existing} and {cls})")
    _METHODS[cls.name] = cls


def _ensure_builtin_methods() -> None:
    # Importing the package's method modules registers them (via Method.__init_subclass__).
    import tensorslim.methods  # noqa: F401


def list_methods() -> list[str]:
    """Names of all registered methods."""
    _ensure_builtin_methods()
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; a clear error naming the known ones otherwise."""
    _ensure_builtin_methods()
    key = name.strip().lower().replace("_", "-")
    for candidate in (name, key, key.replace("-", "_")):
        if candidate in _METHODS:
            return _METHODS[candidate]
    close = difflib.get_close_matches(key, list(_METHODS), n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    raise TensorslimError(f"unknown method '{name}'{hint} (known: {', '.join(sorted(_METHODS))})")


def builder_of(layer: object, prefer: str | None = None) -> str | None:
    """The name of the method whose ``builds`` holds ``layer``'s type (``prefer`` if it does).

    Each structured layer type has one builder; a method that delegates (Tucker's 1×1 convs
    to SVD) names the builder in its options, so the map back from a layer is unambiguous.
    """
    _ensure_builtin_methods()
    preferred = _METHODS.get(prefer or "")
    # a method that declares nothing (written before ``builds`` existed) keeps its layers
    if preferred is not None and (not preferred.builds or type(layer) in preferred.builds):
        return prefer
    builders = sorted(n for n, cls in _METHODS.items() if type(layer) in cls.builds)
    if len(builders) > 1:
        # data-aware methods build the same layers as the method that needs only the weights;
        # a structure read back (init=False) is the same whichever built it: name that one
        builders = [n for n in builders if not _METHODS[n].needs_statistics_to_build]
    if len(builders) > 1:
        raise RuntimeError(f"{type(layer).__name__} is built by several methods: {builders}")
    return builders[0] if builders else None


def get_method(name: str, **settings: Any) -> Method:
    """An instance of the method ``name`` with the given settings (validated by the method).

    ``preset="paper"`` (or any preset the method declares) fills in the preset's settings under
    the explicit ones (:func:`tensorslim.methods.presets.resolve_settings`).
    """
    cls = method_class(name)
    settings = resolve_settings(cls, settings)
    valid = setting_names(cls)
    unknown = sorted(set(settings) - set(valid)) if valid is not None else []
    if unknown:
        close = difflib.get_close_matches(unknown[0], valid or [], n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise TensorslimError(
            f"bad settings for method '{cls.name}': no setting '{unknown[0]}'{hint} (its "
            f"settings: {', '.join(valid) if valid else 'none'}; or preset=NAME)"
        )
    try:
        return cls(**settings)
    except TypeError as exc:
        raise TensorslimError(f"method '{name}': bad settings {settings}: {exc}") from None


def setting_names(cls: type[Method]) -> list[str] | None:
    """The settings a method class accepts (its dataclass fields), None if it cannot tell."""
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls) if f.init]
    return None
