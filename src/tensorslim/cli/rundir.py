"""Run directories: created empty, ``args.json`` first, resumed only with the same arguments,
removed again when a command fails before doing any work — and otherwise the error (or Ctrl-C)
names the exact command that continues the run."""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import typer

from tensorslim.cli.errors import attach_hint
from tensorslim.errors import TensorslimError
from tensorslim.train.checkpoint import atomic_write_text

ARGS_FILE = "args.json"


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


def _clean_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON form of a command's arguments (what args.json holds)."""
    clean = {
        k: v for k, v in args.items() if not callable(v) and not k.startswith("_") and k != "ctx"
    }
    return json.loads(json.dumps(clean, default=str))


def save_args(out: Path, command: str, args: Mapping[str, Any]) -> None:
    """The resolved arguments of a run (JSON), so `eval` and `export` can rebuild its model."""
    text = json.dumps({"command": command, **_clean_args(args)}, indent=2)
    atomic_write_text(out / ARGS_FILE, text)


def read_args(run: Path) -> dict[str, Any]:
    """The arguments a run directory was made with (its args.json)."""
    path = run / ARGS_FILE
    if not path.is_file():
        raise TensorslimError(f"{run} has no {ARGS_FILE}: is it a tensorslim run directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TensorslimError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TensorslimError(f"{path} does not hold a JSON object: it is not a run's arguments")
    return data


# arguments that may differ between a run and its --resume (how to run, not what to compute)
_RESUME_FREE = {"resume", "overwrite", "progress", "trust_code", "out"}


def check_resume_args(out: Path, command: str, args: Mapping[str, Any]) -> None:
    """Refuse to resume ``out`` with other arguments than it was started with."""
    if not (out / ARGS_FILE).is_file():
        return
    saved = read_args(out)
    if saved.get("command") != command:
        raise TensorslimError(
            f"{out} is a '{saved.get('command')}' run, not '{command}': resume it with "
            f"`tensorslim {saved.get('command')} ... --resume`"
        )
    now = _clean_args(args)
    for key, value in now.items():
        if key in _RESUME_FREE or key not in saved or saved[key] == value:
            continue
        raise TensorslimError(
            f"{out} was started with {key}={saved[key]!r} (now {value!r}): resume with the "
            "same arguments, or start a new run with --overwrite"
        )


def continue_command(
    ctx: typer.Context, *, add: Iterable[str] = ("--resume",), drop: Iterable[str] = ()
) -> str:
    """The command line that continues this run: the options the user gave, plus ``add``.

    Built from the command's context (only the parameters given on the command line), so it is
    the user's own command, whatever launched it. ``drop`` names parameters to leave out.
    """
    dropped = {"resume", "overwrite", *drop}
    parts = ["tensorslim", ctx.info_name or ""]
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        if name in dropped or getattr(source, "name", "") != "COMMANDLINE":
            continue
        parts += _render_param(param, ctx.params[name])
    return shlex.join([*parts, *add])


def _render_param(param: Any, value: Any) -> list[str]:
    """The command-line words that give ``param`` (a click parameter) the value ``value``."""
    if getattr(param, "param_type_name", "") == "argument":
        values = value if isinstance(value, list | tuple) else [value]
        return [str(v) for v in values]
    if getattr(param, "is_flag", False):
        if value:
            return [param.opts[0]]
        return [param.secondary_opts[0]] if param.secondary_opts else []
    values = value if getattr(param, "multiple", False) else [value]
    words: list[str] = []
    for v in values:
        words += [param.opts[0], str(v)]
    return words


def _did_work(out: Path, ignore: Iterable[str] = ()) -> bool:
    """True when ``out`` holds anything besides args.json (checkpoints, results, models)."""
    skip = {ARGS_FILE, *ignore}
    return any(p.name not in skip for p in out.iterdir()) if out.is_dir() else False


@contextlib.contextmanager
def discarded_on_failure(out: Path, *, keep: bool, ignore: Iterable[str] = ()) -> Iterator[None]:
    """Remove ``out`` if the body fails before it wrote anything (unless ``keep``).

    What counts as nothing: args.json and the names in ``ignore``. Only the main process of a
    distributed run deletes. Used for the set-up of a run, before any work is saved.
    """
    from tensorslim.train.distributed import is_main_process

    try:
        yield
    except BaseException:
        if not keep and is_main_process() and not _did_work(out, ignore):
            shutil.rmtree(out, ignore_errors=True)
        raise


@contextlib.contextmanager
def open_run(
    ctx: typer.Context,
    out: Path,
    args: Mapping[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    resumable: bool = True,
    hint: Callable[[], str] | None = None,
) -> Iterator[Path]:
    """Prepare the run directory ``out`` for the command of ``ctx``; clean up if the body fails.

    ``args`` are the command's arguments (``dict(locals())`` at the top of the command; the
    context ``ctx`` is left out), saved as args.json.

    Creates ``out`` (refusing a non-empty one unless ``resume`` or ``overwrite``), refuses a
    resume with other arguments than the run was started with, and writes ``args.json``. If the
    body raises (or the user presses Ctrl-C) before it wrote anything else, the directory is
    removed again, so the corrected command is not refused as "not empty". Otherwise the
    directory stays and the exception carries a hint that :func:`handle_errors` prints: the
    command that continues the run (``resumable``), ``hint()`` when given, or how to restart.
    """
    command = ctx.info_name or "run"
    existed = out.is_dir() and any(out.iterdir())
    if resume and existed:
        check_resume_args(out, command, args)
    prepare_run_dir(out, resume=resume, overwrite=overwrite)
    save_args(out, command, args)
    try:
        yield out
    except BaseException as exc:
        if not _did_work(out) and not (resume and existed):
            shutil.rmtree(out, ignore_errors=True)
        elif hint is not None:
            attach_hint(exc, hint())
        elif resumable:
            attach_hint(exc, f"continue with: {continue_command(ctx)}")
        else:
            attach_hint(exc, f"{out} holds a partial run; start again with --overwrite")
        raise
