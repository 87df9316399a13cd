"""The ``tensorslim`` command-line tool.

Every module ``cmd_*.py`` in this package defines ``register(app)`` and is registered here, so a
method that needs its own command adds a file and touches nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from tensorslim.cli.common import state

app = typer.Typer(
    name="tensorslim",
    help="Compress trained PyTorch networks: low rank, tensor decompositions, butterflies, "
    "rank-preserving sparsity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: wraps the text under long option names instead of cutting the names
    # off in a table at 80 columns
    rich_markup_mode=None,
)


@app.callback()
def _global_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    state.debug = debug


for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("cmd_"):
        importlib.import_module(f"{__name__}.{_info.name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="tensorslim")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
