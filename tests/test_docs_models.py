"""README, docs pages and `--help` texts name the same statistical models as the code fits.

The report's primary test is the maximal mixed model `shift ~ A*B + (1 + A + B + A:B || item)`; the screen
tests matched items with the by-item RM-ANOVA. A page that still says `(1|item)` for the report, or a help
text that says the screen fits one Type III ANOVA per feature, contradicts the code and fails here.
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

MAXIMAL = "1 + A + B + A:B || item"
FORMULA = re.compile(r"A\s*\*\s*B\s*\+\s*\(([^()`]*)\)")
INTERCEPT_ONLY = re.compile(r"\(1\s*\\?\|\s*item\)")
# words that mark an intercept-only model as the alternative it is, not as the model the report fits
NAMED_AS_ALTERNATIVE = ("intercept", "anti-conservative", "--random", "random=", "varcomp", "Pig", "lmerTest")


def help_texts() -> dict[str, str]:
    """Every command's and option's help, by command path (the raw texts, before rich wraps them)."""
    from fis_interventions import cli

    cli._register()
    out: dict[str, str] = {}

    def walk(command: Any, path: str) -> None:
        parts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        out[path] = "\n".join(parts)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(cli.app), "fis")
    return out


def texts() -> dict[str, str]:
    found = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in PAGES}
    found.update({f"`{path} --help`": text for path, text in help_texts().items()})
    return found


def model_disagreements(name: str, text: str) -> list[str]:
    """What a text says about the models that disagrees with the code."""
    problems = []
    for formula in FORMULA.finditer(text):
        random = formula.group(1).replace("\\|", "|")
        if " ".join(random.split()) != MAXIMAL:
            problems.append(f"{name}: names the 2x2 mixed model as `A*B + ({random})`; the code fits ({MAXIMAL})")
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if INTERCEPT_ONLY.search(line):
            near = " ".join(lines[max(0, i - 1): i + 2])
            if not any(word in near for word in NAMED_AS_ALTERNATIVE):
                problems.append(f"{name}:{i + 1}: names `(1|item)` without saying it is the intercept-only "
                                f"alternative: {line.strip()[:100]}")
        if re.search(r"Type III (two-way )?ANOVA per feature", line):
            problems.append(f"{name}:{i + 1}: says the screen fits a Type III ANOVA per feature; matched items "
                            "use the by-item RM-ANOVA")
    return problems


def test_the_check_catches_the_old_statements() -> None:
    old_report_readme = "Type III ANOVA, by-item RM-ANOVA, LMM `shift ~ A*B + (1|item)` (REML, Satterthwaite df)."
    old_screen_help = "Which features respond to the design? One Type III two-way ANOVA per feature, BH-FDR."
    assert model_disagreements("old", old_report_readme)
    assert model_disagreements("old", old_screen_help)
    assert not model_disagreements("ok", "`shift ~ A*B + (1 + A + B + A:B \\|\\| item)`; `--random intercept` is "
                                         "`(1|item)`")


@pytest.mark.parametrize("name", sorted(texts()))
def test_every_text_names_the_models_the_code_fits(name: str) -> None:
    problems = model_disagreements(name, texts()[name])
    assert not problems, "; ".join(problems)


def test_screen_help_names_the_within_item_model() -> None:
    screen = help_texts()["fis screen"]
    assert "RM-ANOVA" in screen or "repeated-measures" in screen


def test_the_readme_names_the_primary_model() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert MAXIMAL in readme
