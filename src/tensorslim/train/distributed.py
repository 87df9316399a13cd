"""Small helpers for code that may run under torch.distributed (or not)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from tensorslim.errors import TensorslimError

T = TypeVar("T")


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
    from_main_process(lambda: (fn(), "")[1], str, str)


def from_main_process(
    make: Callable[[], T], encode: Callable[[T], str], decode: Callable[[str], T]
) -> T:
    """``make()`` on rank 0 only; every other rank gets ``decode(encode(result))``.

    For decisions that must be identical on every rank but are not deterministic — a plan
    chosen by timing layers differs between processes, and ranks that build different models
    then fail in the first collective with a size mismatch. Rank 0 keeps its own object (it may
    carry state the text does not). A TensorslimError raised by ``make`` is raised on every rank,
    as in :func:`on_main_process`.
    """
    error: str | None = None
    made: T | None = None
    text = ""
    if is_main_process():
        try:
            made = make()
            text = encode(made)
        except TensorslimError as exc:
            error = str(exc)
    if is_distributed():
        box = [error, text]
        dist.broadcast_object_list(box, src=0)
        error, text = box
    if error is not None:
        if is_main_process():
            raise TensorslimError(error)
        raise TensorslimError(f"rank {rank()} stops: rank 0 failed ({error[:120]})")
    return made if is_main_process() else decode(text)  # type: ignore[return-value]


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
