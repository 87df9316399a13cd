"""Decompositions a method instance computed while planning, kept for its own ``build``.

Planning factorizes every layer once to price its options; ``apply`` then needs the same
factorization at the chosen option. A :class:`Factorizations` store lives on one method instance
(the one ``plan()`` used, carried by the plan it made), never in a module-level cache, so its
memory goes away with the plan. Each entry remembers the weight it was computed from — the
tensor and its version counter — and is served only for a weight with the same values and no
in-place change since, so a stale factorization is never used. ``take`` hands an entry over
once (``apply`` frees it as it builds); a method must give the same result without the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tensorslim.methods.base import Method
    from tensorslim.planner.records import CompressionPlan


@dataclass
class _Entry:
    weight: torch.Tensor  # the planned layer's weight (shares storage; no copy)
    version: int
    value: Any


@dataclass
class Factorizations:
    """Per-layer values keyed by layer name, valid only for the weight they came from."""

    entries: dict[str, _Entry] = field(default_factory=dict)

    def put(self, fqn: str, weight: torch.Tensor, value: Any) -> None:
        """Remember ``value`` as computed from ``weight`` for layer ``fqn``."""
        w = weight.detach()
        self.entries[fqn] = _Entry(w, w._version, value)

    def get(self, fqn: str | None, weight: torch.Tensor) -> Any | None:
        """The value stored for ``fqn`` if ``weight`` still equals the weight it came from."""
        entry = self.entries.get(fqn) if fqn is not None else None
        if entry is None or entry.weight._version != entry.version:
            return None
        w = weight.detach()
        if w is entry.weight or (
            w.shape == entry.weight.shape
            and w.dtype == entry.weight.dtype
            and torch.equal(w, entry.weight)
        ):
            return entry.value
        return None

    def take(self, fqn: str | None, weight: torch.Tensor) -> Any | None:
        """:meth:`get`, then forget the entry (its memory is freed once it is used)."""
        value = self.get(fqn, weight)
        if value is not None:
            del self.entries[fqn]  # type: ignore[arg-type]
        return value

    def keep(self, fqns: set[str]) -> None:
        """Forget every layer not in ``fqns`` (the layers the plan compresses)."""
        for name in [k for k in self.entries if k not in fqns]:
            del self.entries[name]

    def __len__(self) -> int:
        return len(self.entries)


def carry_factorizations(plan: CompressionPlan, method: Method) -> None:
    """Keep ``method``'s factorizations of the layers ``plan`` compresses and let the plan carry
    the method to ``apply``; the other layers' factorizations are freed now."""
    store = getattr(method, "factorizations", None)
    if not isinstance(store, Factorizations):
        return
    store.keep({lp.fqn for lp in plan.compressed_layers if lp.method == method.name})
    if len(store):
        plan.attach_planner(method)
