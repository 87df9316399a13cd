"""Atomic checkpoint files: a crash or kill never leaves a half-written file behind."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from tensorslim.errors import TensorslimError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save a dict of tensors / numbers / strings / containers atomically (torch format).

    Only plain containers go in, so it loads back with ``weights_only=True`` (no pickled code).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RefusedCheckpointError(TensorslimError, pickle.UnpicklingError):
    """A checkpoint ``weights_only`` loading refused (it would have run pickled code)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises:
        RefusedCheckpointError: (a TensorslimError and an UnpicklingError) the file holds
            pickled objects other than plain containers and tensors — never ours to load.
    """
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RefusedCheckpointError(
            f"checkpoint {path} was refused: it holds pickled objects, not only tensors "
            f"({refusal_reason(exc)}); delete it, or start the run again with --overwrite"
        ) from None


def refusal_reason(exc: BaseException) -> str:
    """The line of a ``weights_only`` refusal that names what was refused (the GLOBAL)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line[:160]
    return lines[0][:160] if lines else type(exc).__name__
