"""Compression methods. Every module in this package is imported here, so a new method file
registers itself (``Method.__init_subclass__``) without touching any other file."""

from __future__ import annotations

import importlib
import pkgutil

from tensorslim.methods.base import LayerInfo, Method, Option
from tensorslim.methods.registry import get_method, list_methods, method_class

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "registry"}:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["LayerInfo", "Method", "Option", "get_method", "list_methods", "method_class"]
