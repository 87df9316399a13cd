"""Training hooks: how a method plugs extra loss terms and per-step actions into any loop.

The reference loop (``tensorslim.train.loop.fit``) calls, for each step::

    loss = task_loss + sum(h.extra_loss(model, step) for h in hooks)
    loss.backward()
    for h in hooks: h.after_backward(model, optimizer, step)   # gradients are available
    if not any(h.skips_optimizer_step(step) for h in hooks):
        optimizer.step()                                       # (RigL/RPG mask updates skip it)
    for h in hooks: h.after_step(model, optimizer, step)        # e.g. re-apply masks, prune

and ``on_epoch_end`` after every epoch (its dict is logged). A hook's ``state_dict`` goes into
the checkpoint so that a resumed run continues the same schedule. ``model`` may be wrapped in
DistributedDataParallel; use ``unwrap(model)`` to reach the layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(model, "module", model) if hasattr(model, "module") else model


class TrainHook:
    """Base class: every method is a no-op; override what the method needs."""

    def on_train_begin(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int
    ) -> None:
        """Called once before the first step (``total_steps`` = epochs × steps per epoch)."""

    def extra_loss(self, model: nn.Module, step: int) -> torch.Tensor | None:
        """An extra loss term added to the task loss, or ``None``."""
        return None

    def after_backward(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called with gradients available, before ``optimizer.step()``."""

    def skips_optimizer_step(self, step: int) -> bool:
        """True when this step's gradient must not be applied (e.g. it only scores a regrowth)."""
        return False

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Called after ``optimizer.step()`` (also when a hook skipped it)."""

    def on_epoch_end(self, model: nn.Module, epoch: int) -> dict[str, float]:
        """Metrics to log for the epoch that just ended."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors, numbers, strings, lists and dicts of them)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
