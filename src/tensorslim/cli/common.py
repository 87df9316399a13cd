"""The scaffold the CLI's run commands stand on: shared options, run set-up, base models.

A run command is written as::

    from tensorslim.cli.common import RunArgs, run_command, save_run_model

    def register(app: typer.Typer) -> None:
        @run_command(app, "mine", out=Path("runs/mine"), base=True)
        def mine(
            ctx: typer.Context,
            run: RunArgs,  # the shared options: model, data, --out, --resume, ...
            epochs: int = typer.Option(3, min=0, help="What the command's own option means."),
        ) -> None:
            '''One line for the command list.

            More help.
            '''
            check_my_arguments(...)             # bad input fails before any directory exists
            with run.open(ctx):                  # run directory, args.json, cleanup, hints
                s = run.setup()                  # data, model, example batch
                history, original = run.prepare_base(s)   # --weights, resumed base, or training
                ...                              # the command's own work, with **s.data()
                save_run_model(small, run.out)

:func:`run_command` adds the shared options (:data:`SHARED_OPTIONS`, with their help texts) to
the command's own and turns every failure into one line (:mod:`tensorslim.cli.errors`);
``run.open`` is :func:`~tensorslim.cli.rundir.open_run`: it creates the directory, writes
``args.json``, refuses to resume with other arguments, removes the directory again when the
command fails before doing any work, and otherwise makes the error (or Ctrl-C) name the exact
command that continues. :func:`parse_method` checks ``--method``/``--budget``/``--set``.
Commands that are not run commands use :func:`option` for single shared options.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import typer
import yaml
from torch import nn

from tensorslim.cli.errors import (  # noqa: F401  (re-exported: the commands import them here)
    HINT_ATTRIBUTE,
    attach_hint,
    console_flush,
    fail,
    handle_errors,
    say,
    state,
)
from tensorslim.cli.rundir import (  # noqa: F401  (re-exported)
    ARGS_FILE,
    check_resume_args,
    continue_command,
    discarded_on_failure,
    open_run,
    prepare_run_dir,
    read_args,
    save_args,
)
from tensorslim.cli.setup_result import Setup
from tensorslim.errors import TensorslimError
from tensorslim.train.checkpoint import atomic_write_text

# ---------------------------------------------------------------------------------------------
# shared options

_MODEL_HELP = (
    "Zoo model name (see `tensorslim models`), torchvision:NAME, or module:function to build "
    "your own (path/to/file.py:build works too)."
)
DATA_NAMES = "digits | fashion-mnist | synthetic | module:function (your own loader)."
SHARED_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {"default": "small_cnn", "help": _MODEL_HELP},
    "data": {"default": "digits", "help": DATA_NAMES},
    "data_dir": {
        "default": None,
        "help": "Directory holding the dataset files (it must exist; digits and synthetic "
        "need none).",
    },
    "weights": {
        "default": None,
        "help": "Trained base weights: a .safetensors file or a run directory.",
    },
    "train_epochs": {
        "default": 3,
        "min": 0,
        "help": "Epochs to train the base model first when --weights is not given.",
    },
    "train_lr": {"default": 0.05, "min": 0.0, "help": "Learning rate of that base training."},
    "batch_size": {"default": 128, "min": 1, "help": "Training and evaluation batch size."},
    "seed": {"default": 0, "help": "Seed of the model's initialisation, splits and shuffling."},
    "limit_train": {
        "default": None,
        "min": 1,
        "help": "Use a seeded random subset of this many training samples.",
    },
    "limit_test": {
        "default": None,
        "min": 1,
        "help": "Use a seeded random subset of this many test samples.",
    },
    "out": {"default": Path("runs/run"), "help": "Run directory (created; must be empty)."},
    "resume": {
        "default": False,
        "help": "Continue an interrupted run in --out (same arguments).",
    },
    "overwrite": {"default": False, "help": "Delete a non-empty --out and start again."},
    "progress": {"default": True, "help": "Show progress bars."},
    "method": {"default": "svd", "help": "A registered method (see `tensorslim methods`)."},
    "budget": {
        "default": None,
        "help": "flops=, params= or latency=FRACTION of the original model (latency: measured "
        "at --deployment; default: the method's own per-layer rule).",
    },
    "setting": {
        "default": None,
        "decls": ("--set",),
        "help": "Method setting KEY=VALUE (repeat), e.g. --set scheme=spatial.",
    },
    "preset": {
        "default": None,
        "help": "A named preset of the method's settings, e.g. 'paper' for the official code's "
        "(see README); --set values override it.",
    },
    "trust_code": {
        "default": False,
        "help": "Allow importing the Python code (module:function) that a run directory or "
        "recipe names. Only for files you trust.",
    },
}


def option(name: str, default: Any = ..., **override: Any) -> Any:
    """A ``typer.Option`` for the shared option ``name`` (a key of :data:`SHARED_OPTIONS`).

    ``default`` (and any other ``typer.Option`` keyword) replaces the shared one, e.g.
    ``option("out", Path("runs/train"))`` or ``option("model", "resnet20")``.
    """
    spec = {**SHARED_OPTIONS[name], **override}
    if default is not ...:
        spec["default"] = default
    return typer.Option(spec.pop("default"), *spec.pop("decls", ()), **spec)


# the shared options of a run command, in the order they are listed: what and from where first,
# then how (see run_command); each maps to its type
HEAD_OPTIONS: dict[str, type] = {"model": str, "data": str, "data_dir": Path}
BASE_OPTIONS: dict[str, type] = {"weights": Path, "train_epochs": int, "train_lr": float}
TAIL_OPTIONS: dict[str, type] = {
    "batch_size": int,
    "seed": int,
    "limit_train": int,
    "limit_test": int,
    "out": Path,
    "resume": bool,
    "overwrite": bool,
    "progress": bool,
}


@dataclass
class RunArgs:
    """The shared options of a run command as one value (see :func:`run_command`).

    ``own`` holds the command's own options, so :meth:`as_args` is everything the command was
    given (what args.json records).
    """

    model: str
    data: str
    data_dir: Path | None
    batch_size: int
    seed: int
    limit_train: int | None
    limit_test: int | None
    out: Path
    overwrite: bool
    progress: bool
    resume: bool = False
    weights: Path | None = None
    train_epochs: int = 3
    train_lr: float = 0.05
    own: dict[str, Any] = field(default_factory=dict)

    def as_args(self) -> dict[str, Any]:
        shared = {k: v for k, v in vars(self).items() if k != "own"}
        return {**shared, **self.own}

    def open(self, ctx: typer.Context, **kwargs: Any) -> contextlib.AbstractContextManager[Path]:
        """:func:`open_run` for this run's directory and arguments."""
        return open_run(
            ctx, self.out, self.as_args(), resume=self.resume, overwrite=self.overwrite, **kwargs
        )

    def setup(self, **kwargs: Any) -> Setup:
        """Data, model and example batch of this run (:func:`setup`)."""
        return setup(
            model_name=self.model,
            data=self.data,
            data_dir=self.data_dir,
            seed=self.seed,
            batch_size=self.batch_size,
            limit_train=self.limit_train,
            limit_test=self.limit_test,
            **kwargs,
        )

    def prepare_base(self, s: Setup) -> tuple[list[dict], dict[str, Any]]:
        """The base model trained (:func:`prepare_base` with this run's options) and measured.

        Returns (base training history, measurements of the base model).
        """
        history = prepare_base(
            s,
            weights=self.weights,
            out=self.out,
            resume=self.resume,
            epochs=self.train_epochs,
            lr=self.train_lr,
            progress=self.progress,
            what=f"{self.model} on {self.data}",
            seed=self.seed,
        )
        return history, measure_base(s)


def run_command(
    app: typer.Typer,
    name: str,
    *,
    out: Path,
    base: bool = False,
    resumable: bool = True,
    **defaults: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx, run: RunArgs, **own_options)`` as the command ``name``.

    The command gets the shared options (:data:`SHARED_OPTIONS`: model, data, data dir, batch
    size, seed, subsets, ``--out`` defaulting to ``out``, ``--resume`` when ``resumable``,
    ``--overwrite``, ``--progress``; with ``base`` also ``--weights``, ``--train-epochs`` and
    ``--train-lr``) in front of and after its own, with their help texts, and errors become
    one line (:func:`handle_errors`). ``defaults`` replace shared defaults, e.g.
    ``model="resnet20"``. ``fn`` receives the shared values as one :class:`RunArgs`.
    """
    shared = {**HEAD_OPTIONS, **(BASE_OPTIONS if base else {}), **TAIL_OPTIONS}
    if not resumable:
        shared.pop("resume")
    defaults = {**defaults, "out": out}

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.name not in {"ctx", "run"}]
        own_hints = typing.get_type_hints(fn)

        def make(key: str) -> inspect.Parameter:
            default = option(key, defaults[key]) if key in defaults else option(key)
            return inspect.Parameter(key, KEYWORD, default=default, annotation=shared[key])

        head = [make(k) for k in shared if k not in TAIL_OPTIONS]
        tail = [make(k) for k in shared if k in TAIL_OPTIONS]
        context = inspect.Parameter("ctx", KEYWORD, annotation=typer.Context)

        @functools.wraps(fn)
        def command(ctx: typer.Context, **kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in shared}
            return fn(ctx, RunArgs(**values, own=dict(kwargs)), **kwargs)

        own = [p.replace(kind=KEYWORD, annotation=own_hints.get(p.name, p.annotation)) for p in own]
        command.__signature__ = inspect.Signature([context, *head, *own, *tail])  # type: ignore[attr-defined]
        command.__annotations__ = {"ctx": typer.Context, **{p.name: p.annotation for p in own}}
        command.__annotations__.update(shared)
        del command.__wrapped__  # typer must read the signature above, not fn's
        app.command(name)(handle_errors(command))
        return fn

    return decorator


KEYWORD = inspect.Parameter.KEYWORD_ONLY


# ---------------------------------------------------------------------------------------------
# settings, models, data


@dataclass
class MethodArgs:
    """``--method``, ``--budget``, ``--set`` and ``--preset`` parsed and checked (see
    :func:`parse_method`)."""

    name: str
    budget: Any  # Budget | None
    settings: dict[str, Any]
    method: Any  # the Method instance: its settings are valid


def parse_method(
    method: str, budget: str | None, setting: list[str] | None, preset: str | None = None
) -> MethodArgs:
    """Parse and check a command's method options — before any directory or data exists.

    ``preset`` (``--preset paper``) goes into the settings under ``preset``, where every method
    builder resolves it; ``--set`` values override the preset's.
    """
    from tensorslim.methods import get_method
    from tensorslim.methods.presets import PRESET_KEY
    from tensorslim.planner.ties import check_tied_mode
    from tensorslim.rank.budget import Budget

    settings = parse_settings(setting)
    if preset is not None:
        settings[PRESET_KEY] = preset
    parsed = Budget.parse(budget) if budget else None
    # --set tied=share is the planner's (how tied weights are treated), not the method's
    if "tied" in settings:
        check_tied_mode(settings["tied"])
    method_settings = {k: v for k, v in settings.items() if k != "tied"}
    return MethodArgs(method, parsed, settings, get_method(method, **method_settings))


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

    from tensorslim.io import is_saved, load

    candidates = [path, path / "model", path / "base" / "model"] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_dir() and is_saved(candidate):
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


def require_trust(
    name: str, *, where: str, key: str, trusted: bool, instead: str | None = None
) -> None:
    """Refuse to import the user code ``name`` read from a file unless the user trusts it.

    ``where`` names the file, ``key`` what ``name`` is (model, data); ``instead`` is the other
    way out offered in the error (default: giving ``--KEY`` on the command line).
    """
    from tensorslim.models.external import is_user_code

    if is_user_code(name) and not trusted:
        other = instead if instead is not None else f"give --{key.replace('_', '-')} yourself"
        raise TensorslimError(
            f"{where} names Python code as its {key} ({name!r}) and tensorslim does not run "
            f"code named by a file: pass --trust-code if you trust it"
            + (f", or {other}" if other else "")
        )


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
    """Load the data, build the model for it, and take an example batch for measurements.

    An ``hf:PATH`` model is pretrained and runs on text (:mod:`tensorslim.cli.hf_setup`).
    """
    from tensorslim.data import load_dataset, make_loaders
    from tensorslim.models.huggingface import hf_path

    if hf_path(model_name) is not None:
        from tensorslim.cli.hf_setup import setup_hf

        return setup_hf(model_name, data, seed, batch_size, limit_train, limit_test, latency_batch)

    bundle = load_dataset(data, data_dir, seed=seed, limit_train=limit_train, limit_test=limit_test)
    train_loader, test_loader = make_loaders(bundle, batch_size, seed=seed)
    model = build_model(model_name, bundle.input_shape, bundle.num_classes, seed)
    count = min(latency_batch, len(bundle.test))
    example = torch.stack([bundle.test[i][0] for i in range(count)])
    return Setup(model, bundle, train_loader, test_loader, example)


BASE_PHASE = "train"  # the phase name base training is seeded by (train and compress alike)


def train_base(
    s: Setup,
    *,
    epochs: int,
    lr: float,
    out: Path,
    resume: bool,
    progress: bool,
    optimizer: str = "sgd",
    seed: int | None = None,
) -> list[dict]:
    """Train ``s.model`` with checkpoints under ``out/checkpoints`` and save it to ``out/model``.

    With a ``seed`` the training starts from ``seed_phase(seed, "train")``, whatever ran before.
    """
    from tensorslim.io import save
    from tensorslim.train.loop import fit
    from tensorslim.train.seeding import seed_phase

    if seed is not None:
        seed_phase(seed, BASE_PHASE, loaders=(s.train_loader, s.test_loader))
    history = fit(
        s.model,
        s.train_loader,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        test_loader=s.test_loader,
        checkpoint_dir=out / "checkpoints",
        resume=resume,
        progress=progress,
        log=say,
        description="train",
    ).epochs
    save(s.model, out / "model")
    return history


def prepare_base(
    s: Setup,
    *,
    weights: Path | None,
    out: Path,
    resume: bool,
    epochs: int,
    lr: float,
    progress: bool,
    what: str = "the model",
    seed: int | None = None,
) -> list[dict]:
    """Give ``s.model`` its trained weights: ``weights``, a resumed ``out/base``, or training
    (seeded by ``seed``'s ``train`` phase, see :func:`train_base`).

    Returns the base training history (empty when the weights came from a file).
    """
    from tensorslim.io import is_saved

    if weights is not None:
        load_weights(s.model, weights)
        return []
    if s.text is not None:  # a pretrained model (hf:PATH): nothing to train
        return []
    if resume and is_saved(out / "base" / "model"):
        load_weights(s.model, out / "base" / "model")
        return []
    say(f"no --weights: training {what} for {epochs} epochs first")
    return train_base(
        s, epochs=epochs, lr=lr, out=out / "base", resume=resume, progress=progress, seed=seed
    )


def measure_base(s: Setup, **kwargs: Any) -> dict[str, Any]:
    """Accuracy, params, FLOPs and latency of the base model, announced on stderr."""
    from tensorslim.pipeline import measure

    original = measure(s.model, s.example_batch, s.test_loader, **kwargs)
    accuracy = original.get("accuracy")
    quality = f"accuracy {accuracy:.4f}, " if accuracy is not None else ""
    say(f"original: {quality}FLOPs {original['flops']}")
    return original


def save_run_model(model: nn.Module, out: Path) -> None:
    """The run's final model in ``out/model`` (safetensors + plan + manifest) and its plan.json."""
    from tensorslim.io import PLAN_FILE, save

    save(model, out / "model")
    atomic_write_text(out / PLAN_FILE, (out / "model" / PLAN_FILE).read_text())


def print_result_table(original: Mapping[str, Any], results: Mapping[str, Any]) -> None:
    """The two-row table (original, compressed) every compressing command ends with."""
    from tensorslim.report.run import original_row, summary_row
    from tensorslim.report.tables import print_table

    row = summary_row(results)
    first = {k: v for k, v in original_row(original).items() if k in row}
    print_table("result", list(row), [first, row])
