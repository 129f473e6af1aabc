"""A corpus of malformed design files: each must fail with file, line, field and a useful message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fis_interventions.cli import main
from fis_interventions.designs import load_design, validate
from fis_interventions.errors import FisError

BAD = Path(__file__).parent / "data" / "bad_designs"
EXPECTED = yaml.safe_load((BAD / "expected.yaml").read_text(encoding="utf-8"))


def test_corpus_is_complete() -> None:
    files = {p.stem for p in BAD.glob("*.yaml")} - {"expected"}
    assert files == set(EXPECTED), "every bad file needs an expectation and vice versa"
    assert len(files) >= 20


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_api_error_names_file_line_field(stem: str) -> None:
    exp = EXPECTED[stem]
    path = BAD / f"{stem}.yaml"
    with pytest.raises(FisError) as info:
        load_design(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    assert exp["message"] in msg
    if exp["line"] is not None:
        assert f"line {exp['line']}:" in msg
    else:
        assert "line " not in msg.split("(fix:")[0].replace(str(path), "")
    if exp["field"] is not None:
        assert info.value.field == exp["field"]
    assert "\n" not in msg
    # validate() (the `fis stimuli validate` API) fails the same way, before any tokenizer is needed
    with pytest.raises(FisError) as again:
        validate(path, tokenizer=object())
    assert str(again.value) == msg


@pytest.mark.parametrize("stem", sorted(EXPECTED))
def test_cli_exit_2_one_line_no_traceback(stem: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = BAD / f"{stem}.yaml"
    code = main(["stimuli", "validate", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}")
    assert EXPECTED[stem]["message"] in lines[0]


def test_cli_several_files_reports_each(capsys: pytest.CaptureFixture[str]) -> None:
    files = [str(BAD / "three_factors.yaml"), str(BAD / "unknown_key.yaml")]
    code = main(["stimuli", "validate", "--no-tokenizer", *files])
    err = capsys.readouterr().err
    assert code == 2
    assert "exactly 2 factors" in err and "unknown key" in err and "2 of 2 design file(s)" in err
    assert "Traceback" not in err
