"""Layers whose weight other code reads directly while the model runs.

Some models read a child layer's ``.weight`` outside that layer's forward: Hugging Face's ViT
casts its input to ``patch_embeddings.projection.weight.dtype``, other models tie or inspect
weights on the fly. A structured replacement has no ``weight``, so replacing such a layer would
break the model's forward. While the survey's forward runs, :func:`watch_weight_reads` gives each
candidate layer a subclass that records who reads its ``weight`` when its own forward is not
running; the planner keeps those layers dense and names the reader.

torch's fused Transformer encoder path and ``nn.MultiheadAttention`` read their sub-layers'
weights by design; the planner handles them itself (the encoder path is switched off for
compressed layers, the attention is replaced whole), so their reads are not recorded.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from torch import nn

# readers whose direct weight reads the planner handles (see the module docstring)
HANDLED_READERS = (nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.MultiheadAttention)
_FLAG = "_tensorslim_in_forward"


def _enter(module: nn.Module, args: Any) -> None:
    module.__dict__[_FLAG] = True


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    module.__dict__[_FLAG] = False


def _spy_class(cls: type[nn.Module], reads: dict[int, str]) -> type[nn.Module]:
    """A subclass of ``cls`` recording, in ``reads`` (id → reader), outside reads of weight."""

    def __getattr__(self: nn.Module, name: str) -> Any:
        if name == "weight" and not self.__dict__.get(_FLAG, False):
            reader = sys._getframe(1).f_locals.get("self")
            if isinstance(reader, nn.Module) and not isinstance(reader, HANDLED_READERS):
                reads.setdefault(id(self), type(reader).__name__)
        return cls.__getattr__(self, name)

    return type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__})


@contextlib.contextmanager
def watch_weight_reads(modules: dict[str, nn.Module]) -> Iterator[dict[str, str]]:
    """Within the block, record fqn → the reader's class name for every module of ``modules``
    whose ``weight`` is read while its own forward is not running."""
    by_id: dict[int, str] = {}
    found: dict[str, str] = {}
    classes: dict[type, type] = {}
    originals = {fqn: type(m) for fqn, m in modules.items()}
    handles = []
    for module in modules.values():
        original = type(module)
        spy = classes.setdefault(original, _spy_class(original, by_id))
        module.__class__ = spy
        handles.append(module.register_forward_pre_hook(_enter))
        handles.append(module.register_forward_hook(_leave))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
        for fqn, module in modules.items():
            module.__class__ = originals[fqn]
            module.__dict__.pop(_FLAG, None)
        found.update({fqn: by_id[id(m)] for fqn, m in modules.items() if id(m) in by_id})
