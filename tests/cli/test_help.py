"""Help text: every option explains itself, and nothing is cut off at 80 columns."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from tensorslim.cli import app

runner = CliRunner()
ROOT = get_command(app)
NOT_YET: set[str] = set()  # commands whose help is known to be incomplete (none now)
COMMANDS = sorted(ROOT.commands)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name: str) -> None:
    if name in NOT_YET:
        pytest.skip(f"{name}: its options get their help text with the shared scaffold")
    command = ROOT.commands[name]  # type: ignore[attr-defined]
    missing = [p.name for p in command.params if not getattr(p, "help", "x")]
    assert not missing, f"{name}: options without help: {missing}"


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_fits_80_columns_with_every_option_name_whole(name: str | None) -> None:
    args = ["--help"] if name is None else [name, "--help"]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    assert "…" not in result.stdout
    command = ROOT if name is None else ROOT.commands[name]  # type: ignore[attr-defined]
    words = set(result.stdout.replace("/", " ").replace(",", " ").split())
    for param in command.params:
        for flag in [*param.opts, *getattr(param, "secondary_opts", [])]:
            if flag.startswith("-"):
                assert flag in words, (name, flag)


def test_command_summaries_are_whole_sentences_at_80_columns() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "80"})
    summaries = result.stdout.split("Commands:")[1].splitlines()
    cut = [line for line in summaries if line.endswith("...")]
    assert [line.split()[0] for line in cut] == sorted(NOT_YET), cut
