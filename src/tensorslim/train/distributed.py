"""Small helpers for code that may run under torch.distributed (or not)."""

from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist

from tensorslim.errors import TensorslimError


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only this process logs, shows progress and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def on_main_process(fn: Callable[[], object]) -> None:
    """Run ``fn`` on rank 0 only; if it raises a TensorslimError, every rank raises one.

    Rank 0 keeps its own message; the others say that rank 0 failed, instead of finding out
    later from a collective whose connection rank 0 closed.
    """
    error: str | None = None
    if is_main_process():
        try:
            fn()
        except TensorslimError as exc:
            error = str(exc)
    if is_distributed():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        if is_main_process():
            raise TensorslimError(error)
        raise TensorslimError(f"rank {rank()} stops: rank 0 failed ({error[:120]})")


# what gloo (and nccl) say when the process at the other end of a connection has died
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


def is_peer_failure(exc: BaseException) -> bool:
    """True when ``exc`` means another process of the group died (its own error is the cause).

    Collective operations raise a RuntimeError naming the lost connection when a peer exits;
    reporting that as this rank's error would bury the real one.
    """
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _PEER_GONE)
