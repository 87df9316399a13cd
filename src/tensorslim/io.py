"""Save and load compressed models: safetensors weights + the plan + a manifest. No pickle.

A saved directory holds::

    model.safetensors   every tensor of the state dict (shared tensors stored once)
    plan.json           {"stages": [plan, ...]}: the structure, applied in order to a base model
    manifest.json       format version, library versions, file checksums

The three files are one set, replaced as one: :func:`save` writes the new set into
``.tensorslim-pending/``, syncs it, marks it committed (an atomic rename), and only then moves
the files into place. A reader finding a committed pending set takes each file from there when
it is still there, from its place otherwise — so a kill at any moment leaves the old set or the
new one, never weights from one save with the plan or checksum of another. The next save (or
the next load that may write) finishes a committed set's moves first.

``load(dir, base_model)`` rebuilds the structure on ``base_model`` from the plan (no
decomposition is run), then reads the weights strictly: any mismatch is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from tensorslim import __version__
from tensorslim.errors import TensorslimError
from tensorslim.plan import CompressionPlan, apply, plans_of, refresh_plan, set_plans
from tensorslim.train.checkpoint import atomic_write_text

WEIGHTS_FILE = "model.safetensors"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.json"
SET_FILES = (WEIGHTS_FILE, PLAN_FILE, MANIFEST_FILE)
PENDING_DIR = ".tensorslim-pending"
COMMIT_FILE = "COMMITTED"
FORMAT_VERSION = 1


def save(
    model: nn.Module, directory: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s weights, plan and manifest into ``directory`` (created if needed).

    The set replaces an earlier one as a whole (see the module docstring); other files in
    ``directory`` are left alone.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TensorslimError(
            f"cannot create output directory {directory}: {exc.strerror}"
        ) from None
    stages = [refresh_plan(model, p) for p in plans_of(model)]
    set_plans(model, stages)
    _finish_pending(directory)  # an earlier committed set first, so it cannot mix with this one
    pending = directory / PENDING_DIR
    shutil.rmtree(pending, ignore_errors=True)  # an uncommitted set: never visible to readers
    pending.mkdir()
    safetensors.torch.save_model(model, str(pending / WEIGHTS_FILE), metadata=metadata or {})
    plan_text = json.dumps({"stages": [s.to_dict() for s in stages]}, indent=2)
    (pending / PLAN_FILE).write_text(plan_text)
    manifest = {
        "format": "tensorslim",
        "format_version": FORMAT_VERSION,
        "tensorslim": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_class": type(model).__name__,
        "files": {
            WEIGHTS_FILE: _sha256(pending / WEIGHTS_FILE),
            PLAN_FILE: hashlib.sha256(plan_text.encode()).hexdigest(),
        },
    }
    (pending / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    for name in SET_FILES:
        _fsync(pending / name)
    _commit(pending)
    _finish_pending(directory)
    return directory


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or a directory) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(pending: Path) -> None:
    """The commit point: from here on the pending set is the saved model."""
    atomic_write_text(pending / COMMIT_FILE, "")
    _fsync(pending)


def _move_into_place(source: Path, target: Path) -> None:
    os.replace(source, target)


def _finish_pending(directory: Path) -> None:
    """Move a committed pending set's remaining files into place, then drop the pending dir."""
    pending = directory / PENDING_DIR
    if not (pending / COMMIT_FILE).is_file():
        return
    for name in SET_FILES:
        if (pending / name).is_file():
            _move_into_place(pending / name, directory / name)
    _fsync(directory)
    (pending / COMMIT_FILE).unlink()
    shutil.rmtree(pending, ignore_errors=True)


def set_file(directory: str | Path, name: str) -> Path:
    """Where the current version of the saved file ``name`` is (see the module docstring)."""
    directory = Path(directory)
    pending = directory / PENDING_DIR
    if (pending / COMMIT_FILE).is_file() and (pending / name).is_file():
        return pending / name
    return directory / name


def is_saved(directory: str | Path) -> bool:
    """True when ``directory`` holds a model written by :func:`save`."""
    return set_file(directory, WEIGHTS_FILE).is_file()


def read_plans(directory: str | Path) -> list[CompressionPlan]:
    """The plan stages saved in ``directory`` (a bare single plan file is accepted too)."""
    path = Path(directory)
    path = set_file(path, PLAN_FILE) if path.is_dir() else path
    if not path.is_file():
        raise TensorslimError(f"no {PLAN_FILE} in {directory}: is it a tensorslim save directory?")
    try:
        data: Any = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TensorslimError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "stages" in data:
        return [CompressionPlan.from_dict(stage) for stage in data["stages"]]
    return [CompressionPlan.from_dict(data)]


def load(directory: str | Path, base_model: nn.Module, *, verify: bool = True) -> nn.Module:
    """Rebuild the saved structure on ``base_model`` (modified in place) and load the weights."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TensorslimError(f"{directory} is not a directory saved by tensorslim.save")
    weights = set_file(directory, WEIGHTS_FILE)
    if not weights.is_file():
        raise TensorslimError(f"no {WEIGHTS_FILE} in {directory}: the save is incomplete")
    manifest_path = set_file(directory, MANIFEST_FILE)
    if verify and not manifest_path.is_file():
        warnings.warn(
            f"{directory} has no {MANIFEST_FILE}: its weights cannot be checked against a "
            "checksum (save it again with tensorslim.save to add one)",
            stacklevel=2,
        )
    if verify and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TensorslimError(
                f"{manifest_path} is not valid JSON ({exc}): the save is corrupt"
            ) from None
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise TensorslimError(
                f"{directory} was saved by a newer tensorslim (format "
                f"{manifest['format_version']}): upgrade tensorslim to load it"
            )
        for name in (WEIGHTS_FILE, PLAN_FILE):
            expected = manifest.get("files", {}).get(name)
            path = set_file(directory, name)
            if expected and path.is_file() and expected != _sha256(path):
                raise TensorslimError(
                    f"{directory / name} does not match its checksum: the file is corrupt"
                )
    model = base_model
    for stage in read_plans(directory):
        model = apply(model, stage, init=False, inplace=True)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False)
    except safetensors.SafetensorError as exc:
        # an unreadable file is a broken save, not a wrong base model
        raise TensorslimError(
            f"{weights} is not a readable safetensors file ({exc}): the save is corrupt"
        ) from None
    except RuntimeError as exc:
        # load_state_dict's first line only names the class; the next names the tensor
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise TensorslimError(
            f"weights in {weights} do not fit the base model ({detail}): "
            "pass the same architecture that was compressed"
        ) from None
    if missing or unexpected:
        what = (
            f"missing {sorted(missing)[:3]}" if missing else f"unexpected {sorted(unexpected)[:3]}"
        )
        raise TensorslimError(
            f"weights in {weights} do not fit the base model ({what}): "
            "pass the same architecture that was compressed"
        )
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
