"""The README's commands: the two set-up commands come first, and every `pi05-export` command and option it
shows exists (the demo itself runs in CI as `make ci-validate`)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pi05_export.cli._app import app

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_setup_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make install", "make test"]


def _readme_invocations() -> list[list[str]]:
    calls = []
    for line in README.splitlines():
        for m in re.finditer(r"pi05-export ([a-z][a-z-]*)((?: +--?[a-z][a-z0-9-]*)|(?: +[^ `|#]+))*", line):
            calls.append(m.group(0).split()[1:])
    return calls


@pytest.mark.parametrize("argv", _readme_invocations(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_and_options_exist(argv):
    result = CliRunner().invoke(app, [argv[0], "--help"], terminal_width=200)
    assert result.exit_code == 0, f"unknown command {argv[0]}"
    help_text = result.output
    for opt in (a for a in argv[1:] if a.startswith("--")):
        assert opt.split("=")[0] in help_text, f"`pi05-export {argv[0]}` has no option {opt}"
