"""Process-group set-up for ``torchrun`` launches (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn

from tensorslim.errors import TensorslimError


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; True when distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    try:
        dist.init_process_group(backend)
    except (RuntimeError, ValueError) as exc:
        raise TensorslimError(f"cannot join the {backend} process group: {exc}") from None
    return True


def shutdown() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (after a structure change)."""
    if dist.is_available() and dist.is_initialized():
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)


def check_same_state(model: nn.Module) -> dict[str, str]:
    """This rank's :func:`state_digest`, after checking every rank holds the same one.

    Raises:
        TensorslimError: (on every rank) some tensors differ between the processes — the
            run would report one model while the ranks hold others.
    """
    mine = state_digest(model)
    if not (dist.is_available() and dist.is_initialized()):
        return mine
    everyone: list[dict[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    differ = sorted(
        {name for other in everyone for name in set(mine) | set(other or {})
         if (other or {}).get(name) != mine.get(name)}
    )  # fmt: skip
    if differ:
        raise TensorslimError(
            f"the {len(everyone)} processes ended with different weights in {len(differ)} of "
            f"{len(mine)} tensors (first: {differ[0]}): the run is not consistent"
        )
    return mine


def state_digest(model: nn.Module) -> dict[str, str]:
    """SHA-256 of every tensor in the state dict: equal digests mean bitwise-equal models."""
    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous()
        out[name] = hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out
