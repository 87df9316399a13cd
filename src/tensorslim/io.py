"""Save and load compressed models: safetensors weights + the plan + a manifest. No pickle.

A saved directory holds::

    model.safetensors   every tensor of the state dict (shared tensors stored once)
    plan.json           {"stages": [plan, ...]}: the structure, applied in order to a base model
    manifest.json       format version, library versions, file checksums

``load(dir, base_model)`` rebuilds the structure on ``base_model`` from the plan (no
decomposition is run), then reads the weights strictly: any mismatch is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import platform
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
FORMAT_VERSION = 1


def save(
    model: nn.Module, directory: str | Path, *, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``model``'s weights, plan and manifest into ``directory`` (created if needed)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TensorslimError(
            f"cannot create output directory {directory}: {exc.strerror}"
        ) from None
    stages = [refresh_plan(model, p) for p in plans_of(model)]
    set_plans(model, stages)
    weights = directory / WEIGHTS_FILE
    tmp = weights.with_name(f".{WEIGHTS_FILE}.tmp")
    safetensors.torch.save_model(model, str(tmp), metadata=metadata or {})
    tmp.replace(weights)
    plan_text = json.dumps({"stages": [s.to_dict() for s in stages]}, indent=2)
    atomic_write_text(directory / PLAN_FILE, plan_text)
    manifest = {
        "format": "tensorslim",
        "format_version": FORMAT_VERSION,
        "tensorslim": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_class": type(model).__name__,
        "files": {
            WEIGHTS_FILE: _sha256(weights),
            PLAN_FILE: hashlib.sha256(plan_text.encode()).hexdigest(),
        },
    }
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2))
    return directory


def is_saved(directory: str | Path) -> bool:
    """True when ``directory`` holds a model written by :func:`save`."""
    return (Path(directory) / WEIGHTS_FILE).is_file()


def read_plans(directory: str | Path) -> list[CompressionPlan]:
    """The plan stages saved in ``directory`` (a bare single plan file is accepted too)."""
    path = Path(directory)
    path = path / PLAN_FILE if path.is_dir() else path
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
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise TensorslimError(f"no {WEIGHTS_FILE} in {directory}: the save is incomplete")
    manifest_path = directory / MANIFEST_FILE
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
        expected = manifest.get("files", {}).get(WEIGHTS_FILE)
        if expected and expected != _sha256(weights):
            raise TensorslimError(f"{weights} does not match its checksum: the file is corrupt")
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
