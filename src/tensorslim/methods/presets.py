"""Named presets of a method's settings: ``preset="paper"`` reproduces the authors' official code.

A method declares its presets on the class (``Method.presets``, a mapping from name to
:class:`Preset`); the name ``"default"`` always exists and changes nothing. A preset holds

- ``settings``: values of the method's own settings (its constructor keyword arguments), and
- ``training``: values of the training loop's settings that the pipelines read (``lr``,
  ``optimizer``, ``weight_decay``, ...), for methods whose paper fixes how they train.

Resolution, everywhere a method is built (:func:`tensorslim.methods.registry.get_method`, so the
Python API, ``ts.plan``, ``compress_model``, the CLI's ``--preset`` / ``--set`` and recipes'
``preset:`` all go through it): the settings the caller wrote win over the preset's, the
preset's win over the method's defaults. The method then stores the resolved values (the plan
records them), so rebuilding it from a plan needs no preset.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tensorslim.errors import TensorslimError

if TYPE_CHECKING:
    from tensorslim.methods.base import Method

DEFAULT_PRESET = "default"
# the key under which a preset name may travel inside a settings mapping (``--set preset=paper``)
PRESET_KEY = "preset"


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Preset:
    """One named set of settings: ``settings`` of the method, ``training`` of the loop.

    ``source`` says where the values come from (e.g. the official repository and script), so a
    reader can check them; ``description`` is one line for tables.
    """

    settings: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        # read-only views: a preset is a class-level constant shared by every instance
        object.__setattr__(self, "settings", _frozen(self.settings))
        object.__setattr__(self, "training", _frozen(self.training))


_NO_PRESET = Preset(description="the method's own defaults")


def preset_names(cls: type[Method]) -> list[str]:
    """The presets ``cls`` accepts: ``default`` first, then its declared ones."""
    return [DEFAULT_PRESET, *sorted(n for n in cls.presets if n != DEFAULT_PRESET)]


def get_preset(cls: type[Method], name: str | None) -> Preset:
    """The preset ``name`` of ``cls`` (``None`` / ``"default"``: no change); a one-line error
    listing the valid names otherwise."""
    if name is None or name == DEFAULT_PRESET:
        return cls.presets.get(DEFAULT_PRESET, _NO_PRESET)
    if not isinstance(name, str) or name not in cls.presets:
        raise TensorslimError(
            f"unknown preset {name!r} for method '{cls.name}' (valid: "
            f"{', '.join(preset_names(cls))})"
        )
    return cls.presets[name]


def resolve_settings(cls: type[Method], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the preset they name (key ``preset``) filled in under them.

    ``{"preset": "paper", "end": 0.5}`` → the paper preset's settings with ``end`` = 0.5: what
    the caller wrote explicitly overrides the preset.
    """
    explicit = dict(settings)
    preset = get_preset(cls, explicit.pop(PRESET_KEY, None))
    return {**preset.settings, **explicit}


def resolve_training(
    cls: type[Method], preset: str | None, defaults: Mapping[str, Any], **explicit: Any
) -> dict[str, Any]:
    """Training-loop settings: ``explicit`` values that are not ``None``, else the preset's, else
    ``defaults`` (keys of ``defaults`` and ``explicit`` only; a preset cannot add new ones)."""
    chosen = get_preset(cls, preset).training
    out = {}
    for key in {*defaults, *explicit}:
        value = explicit.get(key)
        out[key] = value if value is not None else chosen.get(key, defaults.get(key))
    return out
