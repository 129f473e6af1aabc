"""The CLI's terminal stays readable: libraries' deprecation notices go to a log file, statistics warnings
are shown once, in one line without file paths, and our own warnings read as 'warning: ...'."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

from test_battery import ROOT

from fis_interventions import cli
from fis_interventions.errors import FisWarning


def test_battery_cli_prints_no_library_noise(tiny_ckpt, tmp_path):
    design = ROOT / "stimuli" / "negation_sentiment.yaml"
    config = tmp_path / "b.yaml"
    config.write_text(f"name: q\nmodel: tiny-random\ncheckpoint: {tiny_ckpt}\ndesigns: [{design}]\n"
                      "features: [{point: sae.hook_latents, index: 1}]\ninterventions: [{kind: scale, values: [4]}]\n"
                      f"max_items: 1\ndevice: cpu\nout: {tmp_path / 'run'}\n", encoding="utf-8")
    # a fresh process: transformers warns about `past_key_values` once per process, so in-process the
    # warning may already have been spent by an earlier test
    env = {**os.environ, "FIS_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fis_interventions.cli", "battery", str(config), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "Warning" not in err and "past_key_values" not in err and ".py:" not in err, err
    log = tmp_path / "cache" / "warnings.log"
    if log.exists():  # whatever the libraries said went here (which notices they raise varies by version)
        assert "Warning" in log.read_text(encoding="utf-8")


def test_statistics_warnings_once_in_our_words(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FIS_CACHE", str(tmp_path / "cache"))

    class ValueWarning(UserWarning):  # the shape of statsmodels' warning classes
        pass

    with warnings.catch_warnings():
        cli._route_warnings()
        for _ in range(3):
            warnings.warn("An unsupported index was provided.\nSecond line", ValueWarning, stacklevel=1)
        warnings.warn("cell 'a' has 3 items, cell 'b' has 4", FisWarning, stacklevel=1)
        warnings.warn("`past_key_values` is deprecated", FutureWarning, stacklevel=1)  # transformers' kind
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["warning: value: An unsupported index was provided.",
                     "warning: cell 'a' has 3 items, cell 'b' has 4"]
    assert "`past_key_values` is deprecated" in (tmp_path / "cache" / "warnings.log").read_text(encoding="utf-8")
