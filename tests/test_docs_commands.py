"""Every `fis ...` command line in README.md and docs/ names a command and options the CLI has.

A page that shows an option which was renamed or removed fails here, not in a reader's terminal. Lines are
parsed against the click command tree (no command is run): the words after `fis` must name a command, and
every `--option` written after it must be one of that command's options.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "reports" / "README.md", ROOT / "stimuli" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]


def _cli() -> Any:
    from fis_interventions import cli

    cli._register()
    return typer.main.get_command(cli.app)


def command_lines(text: str) -> list[str]:
    """`fis ...` lines of code blocks (continuations joined, comments dropped) and inline `fis ...` spans."""
    found: list[str] = []
    in_block = False
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            in_block = not in_block
            pending = ""
            continue
        if in_block:
            line = pending + raw.strip()
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            pending = ""
            line = re.sub(r"^\$\s*", "", line)
            if line.startswith("fis ") or line == "fis":
                found.append(" ".join(line.split(" #", 1)[0].split()))
        else:
            found += [span for span in re.findall(r"`(fis [^`]+)`", raw)]
    return found


def check_line(root: Any, line: str) -> str | None:
    """None when the line parses against the CLI, else what is wrong."""
    words = line.split()[1:]
    command = root
    path = ["fis"]
    while words and hasattr(command, "commands"):  # a group (typer may vendor its own click)
        name = words[0]
        if name.startswith("-") or name.isupper() or not re.fullmatch(r"[a-z][a-z-]*", name):
            break
        sub = command.commands.get(name)
        if sub is None:
            return f"unknown command {' '.join(path)} {name}"
        command, path, words = sub, [*path, name], words[1:]
    if hasattr(command, "commands") and words and "run" in command.commands and not words[0].startswith("-"):
        command, path = command.commands["run"], [*path, "run"]  # `fis battery FILE` = `fis battery run FILE`
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    options |= {"--help"}
    for word in words:
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", word):
            if flag not in options:
                return f"{' '.join(path)} has no option {flag}"
    return None


def test_the_parser_catches_unknown_commands_and_options() -> None:
    root = _cli()
    assert check_line(root, "fis report RUN --out reports/x") is None
    assert check_line(root, "fis stimuli validate FILE...") is None
    assert check_line(root, "fis battery my.yaml --shard 1/2") is None
    assert "no option --bogus" in (check_line(root, "fis battery merge RUN --bogus") or "")
    assert "no option --bogus" in (check_line(root, "fis report RUN [--bogus]") or "")
    assert "unknown command" in (check_line(root, "fis reportt RUN") or "")
    assert command_lines("```bash\nfis screen --checkpoint C \\\n   --nope 1   # comment --x\n```") == [
        "fis screen --checkpoint C --nope 1"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_fis_command_in_the_docs_exists(page: Path) -> None:
    root = _cli()
    problems = [f"{line!r}: {why}" for line in command_lines(page.read_text(encoding="utf-8"))
                if (why := check_line(root, line))]
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_the_readme_shows_commands() -> None:
    assert len(command_lines((ROOT / "README.md").read_text(encoding="utf-8"))) >= 8
