"""Re-estimating BatchNorm statistics after the layers before them changed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from tensorslim.inputs import ForwardFn, call_on_batch, model_device, to_device
from tensorslim.train.distributed import is_distributed

__all__ = ["recalibrate_batchnorm"]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, loader: Iterable, batches: int = 10, forward_fn: ForwardFn | None = None
) -> int:
    """Re-estimate every BatchNorm's running mean/variance on ``batches`` training batches.

    Replacing a layer by an approximation (a truncated SVD, a decomposition, pruned singular
    values) changes the statistics of its output, so the running statistics collected on the
    dense model no longer match the BatchNorm that follows; a few forward passes (no gradient,
    no labels) fix that before the model is evaluated or fine-tuned. The running averages are
    cumulative (momentum None) over the batches, then each BatchNorm's momentum is restored.
    Batches take any structure :mod:`tensorslim.inputs` accepts (or ``forward_fn``).
    Inside a ``torch.distributed`` group each rank sees its own shard, so the statistics are then
    averaged over the ranks (weighted by the batches each used): every rank ends with the same
    running mean and variance. Returns the number of batches used here (0 without BatchNorm).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches <= 0:
        return 0
    saved = [(m.momentum, m.training) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches seen
    was_training = model.training
    model.train()
    device = model_device(model)
    used = 0
    try:
        for batch in loader:
            if used >= batches:
                break
            call_on_batch(model, to_device(batch, device), forward_fn)
            used += 1
    finally:
        model.train(was_training)
        for m, (momentum, _) in zip(norms, saved, strict=True):
            m.momentum = momentum
    _average_over_ranks(norms, used)
    return used


def _average_over_ranks(norms: list[nn.Module], used: int) -> None:
    """Replace each rank's running statistics by their batch-weighted mean over the ranks."""
    if not is_distributed():
        return
    weight = torch.tensor(float(used))
    dist.all_reduce(weight)
    for m in norms:
        for name in ("running_mean", "running_var"):
            stat = getattr(m, name)
            if stat is None:
                continue
            total = stat.double() * used
            dist.all_reduce(total)
            stat.copy_((total / weight.clamp_min(1.0)).to(stat.dtype))
        if m.num_batches_tracked is not None:
            dist.broadcast(m.num_batches_tracked, src=0)
