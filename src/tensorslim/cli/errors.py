"""How the CLI fails: one line on stderr for every error (the traceback only with --debug),
one line per library warning, and Ctrl-C as exit code 130 — each with the hint, if any, that
says how to continue (attached by :func:`tensorslim.cli.rundir.open_run`)."""

from __future__ import annotations

import contextlib
import functools
import pickle
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import typer

from tensorslim.errors import TensorslimError

F = TypeVar("F", bound=Callable[..., Any])
# the attribute set on an exception to tell handle_errors how to continue
HINT_ATTRIBUTE = "tensorslim_hint"


@dataclass
class _State:
    debug: bool = False


state = _State()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print a one-line error and return the Exit to raise."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _with_hint(message: str, exc: BaseException) -> str:
    hint = getattr(exc, HINT_ATTRIBUTE, None)
    return f"{message}; {hint}" if hint else message


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # type: ignore[no-untyped-def]
    """Library warnings as ``warning: …`` lines (no source line, no file name)."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


def _describe(exc: BaseException) -> str:
    """The one line that stands for ``exc`` on the command line."""
    from tensorslim.train.distributed import is_peer_failure, rank

    if isinstance(exc, TensorslimError):
        return str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        from tensorslim.train.checkpoint import refusal_reason

        return (
            f"refused to unpickle a file ({refusal_reason(exc)}): tensorslim loads only "
            "plain tensors; delete the file or start the run again with --overwrite"
        )
    if is_peer_failure(exc):
        return f"rank {rank()} stops: another process of this run failed (its error is above)"
    return f"{type(exc).__name__}: {_first_line(exc)} (rerun with --debug for the traceback)"


def handle_errors(fn: F) -> F:
    """Turn every failure into one line on stderr (full traceback with --debug).

    User errors (:class:`TensorslimError`) print their message; other exceptions their type and
    first line; Ctrl-C exits 130. A hint that :func:`open_run` attached (how to continue the
    run) is appended. Library warnings are printed as one ``warning:`` line each.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt as exc:
                if state.debug:
                    raise
                hint = getattr(exc, HINT_ATTRIBUTE, None)
                typer.secho(
                    f"interrupted{': ' + hint if hint else ''}", fg=typer.colors.YELLOW, err=True
                )
                raise typer.Exit(130) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:
                if state.debug:
                    raise
                raise fail(_with_hint(_describe(exc), exc)) from None

    return wrapper  # type: ignore[return-value]


def say(message: str) -> None:
    """Progress messages go to stderr so stdout stays machine-readable."""
    typer.echo(message, err=True)


def console_flush() -> None:
    sys.stdout.flush()
    sys.stderr.flush()


def attach_hint(exc: BaseException, text: str) -> None:
    """Tell :func:`handle_errors` what to add to ``exc``'s line (how to continue); first wins."""
    if not getattr(exc, HINT_ATTRIBUTE, None):
        with contextlib.suppress(AttributeError):  # a few builtins refuse attributes
            setattr(exc, HINT_ATTRIBUTE, text)
