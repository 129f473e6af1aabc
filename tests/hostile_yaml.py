"""Generators of hostile and of large-but-valid YAML files (used by tests/test_yaml_limits.py and
bench/yaml_load.py); nothing here is committed as data, every file is written on the fly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "stimuli" / "negation_sentiment.yaml"


def _bomb_lines(levels: int = 9) -> str:
    """A billion-laughs chain: each level is a list of ten aliases to the level below (10^levels leaves)."""
    lines = ['a0: &a0 ["lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines)


def _design_head() -> str:
    """The shipped negation x sentiment design, whose keys the hostile variants below extend."""
    return SHIPPED.read_text(encoding="utf-8")


def bomb_in_unknown_key(path: Path) -> Path:
    path.write_text(_design_head() + "\nunknown_block:\n" + "\n".join("  " + ln for ln in _bomb_lines().splitlines())
                    + "\n", encoding="utf-8")
    return path


def bomb_in_description(path: Path) -> Path:
    text = _design_head()
    head, _, rest = text.partition("description: >")
    body = rest.split("\nfactors:", 1)[1]
    bomb = "\n".join("  " + ln for ln in _bomb_lines().splitlines())
    path.write_text(f"{head}description:\n{bomb}\nfactors:{body}", encoding="utf-8")
    return path


def bomb_in_targets(path: Path) -> Path:
    text = _design_head()
    anchors = "\n".join(ln for ln in _bomb_lines().splitlines())
    text = text.replace("  targets:\n", "  targets:\n    bombed: [*a9]\n", 1)
    path.write_text(f"x_anchors:\n" + "\n".join("  " + ln for ln in anchors.splitlines()) + "\n" + text,
                    encoding="utf-8")
    return path


def recursive_alias(path: Path) -> Path:
    path.write_text(_design_head() + "\nloop: &r [*r]\n", encoding="utf-8")
    return path


def recursive_mapping(path: Path) -> Path:
    path.write_text("name: x\nloop: &m {self: *m}\n", encoding="utf-8")
    return path


def deep_nesting(path: Path, depth: int = 10_000) -> Path:
    path.write_text("name: x\ndeep: " + "[" * depth + "]" * depth + "\n", encoding="utf-8")
    return path


def deep_block_nesting(path: Path, depth: int = 3_000) -> Path:
    path.write_text("name: x\n" + "".join(f"{' ' * i}k{i}:\n" for i in range(depth)) + " " * depth + "v: 1\n",
                    encoding="utf-8")
    return path


def huge_file(path: Path, megabytes: int = 50) -> Path:
    line = "  - {id: i%d, slots: {subject: The soup, verb: was, adjective: {positive: good, negative: bad}}}\n"
    chunk = "".join(line % i for i in range(10_000))
    with path.open("w", encoding="utf-8") as fh:
        fh.write("name: huge\nitems:\n")
        while fh.tell() < megabytes * 2**20:
            fh.write(chunk)
    return path


def duplicate_top_key(path: Path) -> Path:
    path.write_text(_design_head() + "\nname: again\n", encoding="utf-8")
    return path


HOSTILE: dict[str, Callable[[Path], Path]] = {
    "alias bomb in unknown key": bomb_in_unknown_key,
    "alias bomb in description": bomb_in_description,
    "alias bomb in targets": bomb_in_targets,
    "recursive alias (list)": recursive_alias,
    "recursive alias (mapping)": recursive_mapping,
    "10,000-level flow nesting": deep_nesting,
    "3,000-level block nesting": deep_block_nesting,
    "50 MB file": huge_file,
    "duplicate key": duplicate_top_key,
}


def big_design(path: Path, n_items: int = 20_000) -> Path:
    """A valid design with ``n_items`` matched items (unique ids, the shipped template and targets)."""
    text = _design_head()
    head, _, rest = text.partition("items:\n")
    readout = rest[rest.index("readout:"):]
    adjectives = [("good", "bad"), ("fine", "poor"), ("great", "awful"), ("nice", "nasty")]
    items = "".join(f"  - {{id: it{i}, slots: {{subject: The thing number {i}, verb: was, adjective: "
                    f"{{positive: {adjectives[i % 4][0]}, negative: {adjectives[i % 4][1]}}}}}}}\n"
                    for i in range(n_items))
    path.write_text(f"{head}items:\n{items}{readout}", encoding="utf-8")
    return path
