"""Usage errors (unknown option, missing argument, bad value) print ONE line naming the flag and exit 2, for
every command and subcommand, under whichever click the installed typer uses (typer >= 0.2x vendors its own
click as ``typer._click``, whose exceptions are not ``click``'s). Commands are discovered from the typer app,
so a new command is covered without editing this file."""

from __future__ import annotations

import pytest
import typer

from fis_interventions import cli

cli._register()


def _walk(command, path: tuple[str, ...] = ()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(cli.app)))
LEAVES = [(path, cmd) for path, cmd in COMMANDS if not getattr(cmd, "commands", None)]
WITH_REQUIRED = [(path, cmd) for path, cmd in LEAVES if any(p.required for p in cmd.params)]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert lines[0].startswith("error: ")
    return lines[0]


def test_every_command_is_discovered():
    names = {" ".join(path) for path, _ in LEAVES}
    assert {"train", "eval", "screen", "stats", "battery run", "battery merge", "model info",
            "stimuli validate"} <= names


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "fis")
def test_unknown_option_is_one_line_exit_2(path, capsys):
    assert cli.main([*path, "--no-such-flag"]) == 2
    line = _one_error_line(capsys)
    assert "--no-such-flag" in line
    assert f"fis {' '.join(path)}".strip() + " --help" in line  # where the right flags are listed


@pytest.mark.parametrize("path,command", WITH_REQUIRED, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_missing_argument_is_one_line_exit_2(path, command, capsys):
    assert cli.main(list(path)) == 2
    line = _one_error_line(capsys)
    first = next(p for p in command.params if p.required)
    named = first.opts[0] if first.param_type_name == "option" else first.name
    assert named.lower() in line.lower(), line


def test_bad_value_names_the_flag(capsys):
    assert cli.main(["eval", "ckpt", "--max-contexts", "many"]) == 2
    assert "--max-contexts" in _one_error_line(capsys)
    assert cli.main(["battery", "run", "b.yaml", "--max-batch-rows", "0"]) == 2
    assert "--max-batch-rows" in _one_error_line(capsys)


def test_option_another_command_has_is_named(capsys):
    # `fis screen` reads its harvest from the checkpoint; it has --cards-activations, not --activations
    assert cli.main(["screen", "--activations", "x"]) == 2
    line = _one_error_line(capsys)
    assert "--activations" in line and "--cards-activations" in line


@pytest.mark.parametrize("path", [(), ("model",), ("battery",)], ids=lambda p: " ".join(p) or "fis")
def test_group_without_subcommand_shows_help(path, capsys):
    assert cli.main(list(path)) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.out + captured.err
