"""Pieces shared by the CLI commands: error handling, run directories, model and data set-up."""

from __future__ import annotations

import functools
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import typer
import yaml
from torch import nn

from tensorslim.errors import TensorslimError
from tensorslim.train.checkpoint import atomic_write_text

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _State:
    debug: bool = False


state = _State()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn user errors into one line on stderr (full traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TensorslimError as exc:
            if state.debug:
                raise
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            if state.debug:
                raise
            typer.secho(
                "interrupted: finished epochs are checkpointed; rerun with --resume to continue",
                fg=typer.colors.YELLOW,
                err=True,
            )
            raise typer.Exit(130) from None
        except (OSError, RuntimeError, ValueError) as exc:
            if state.debug:
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise fail(
                f"{type(exc).__name__}: {first} (rerun with --debug for the traceback)"
            ) from None

    return wrapper  # type: ignore[return-value]


def say(message: str) -> None:
    """Progress messages go to stderr so stdout stays machine-readable."""
    typer.echo(message, err=True)


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> Path:
    """Create ``out``; refuse a non-empty one unless resuming or overwriting."""
    if out.exists() and not out.is_dir():
        raise TensorslimError(f"output path {out} is a file: choose a directory with --out")
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise TensorslimError(
                f"run directory {out} is not empty: pass --resume to continue it or "
                "--overwrite to start again"
            )
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise TensorslimError(f"cannot write to {out}: {exc.strerror}") from None
    return out


def save_args(out: Path, command: str, args: dict[str, Any]) -> None:
    """The resolved arguments of a run (JSON), so `eval` and `export` can rebuild its model."""
    clean = {k: v for k, v in args.items() if not callable(v) and not k.startswith("_")}
    text = json.dumps({"command": command, **clean}, indent=2, default=str)
    atomic_write_text(out / "args.json", text)


def read_args(run: Path) -> dict[str, Any]:
    path = run / "args.json"
    if not path.is_file():
        raise TensorslimError(f"{run} has no args.json: is it a tensorslim run directory?")
    return json.loads(path.read_text())


def parse_settings(items: list[str] | None) -> dict[str, Any]:
    """``["rank=8", "scheme=spatial"]`` → ``{"rank": 8, "scheme": "spatial"}`` (YAML values)."""
    settings: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TensorslimError(f"bad --set '{item}': write KEY=VALUE, e.g. --set rank=8")
        try:
            settings[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TensorslimError(f"bad --set '{item}': value is not valid YAML") from None
    return settings


def build_model(name: str, bundle_shape: tuple[int, ...], num_classes: int, seed: int) -> nn.Module:
    """A zoo model sized for the data (input channels, classes), seeded."""
    from tensorslim.models import create_model

    torch.manual_seed(seed)
    return create_model(name, in_channels=int(bundle_shape[0]), num_classes=num_classes)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Dense weights from a safetensors file or a tensorslim save/run directory."""
    import safetensors.torch

    from tensorslim.io import WEIGHTS_FILE, load

    candidates = [path, path / "model", path / "base" / "model"] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_dir() and (candidate / WEIGHTS_FILE).is_file():
            return load(candidate, model)
        if candidate.is_file():
            try:
                missing, unexpected = safetensors.torch.load_model(
                    model, str(candidate), strict=False
                )
            except Exception as exc:
                raise TensorslimError(f"cannot read weights {candidate}: {exc}") from None
            if missing or unexpected:
                raise TensorslimError(
                    f"weights {candidate} do not fit the model (missing {sorted(missing)[:2]}, "
                    f"unexpected {sorted(unexpected)[:2]}): check --model"
                )
            return model
    raise TensorslimError(f"no weights at {path}: give a .safetensors file or a run directory")


def console_flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


@dataclass
class Setup:
    """Everything a command needs about its data and model."""

    model: nn.Module
    bundle: Any
    train_loader: Any
    test_loader: Any
    example_batch: torch.Tensor


def setup(
    *,
    model_name: str,
    data: str,
    data_dir: Path | None,
    seed: int,
    batch_size: int,
    limit_train: int | None = None,
    limit_test: int | None = None,
    latency_batch: int = 32,
) -> Setup:
    """Load the data, build the model for it, and take an example batch for measurements."""
    from tensorslim.data import load_dataset, make_loaders

    bundle = load_dataset(data, data_dir, seed=seed, limit_train=limit_train, limit_test=limit_test)
    train_loader, test_loader = make_loaders(bundle, batch_size, seed=seed)
    model = build_model(model_name, bundle.input_shape, bundle.num_classes, seed)
    count = min(latency_batch, len(bundle.test))
    example = torch.stack([bundle.test[i][0] for i in range(count)])
    return Setup(model, bundle, train_loader, test_loader, example)
