"""The ``fis`` command. Each subcommand is a thin wrapper over a Python API function of the same name.

User errors (:class:`FisError`) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from pathlib import Path

import click
import typer

from .errors import FisError, FisWarning

app = typer.Typer(help="fis-interventions: joint SAEs, factorial designs, interventions and statistics.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _register() -> None:
    """Import the modules that add their commands to ``app`` (kept lazy-light: heavy imports live inside)."""
    from . import commands  # noqa: F401


_LIBRARY_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def warnings_log() -> Path:
    """Where third-party deprecation warnings go instead of the terminal (``$FIS_CACHE/warnings.log``)."""
    from .models import cache_dir

    return cache_dir() / "warnings.log"


def _route_warnings() -> None:
    """Show the user our warnings and the statistics' warnings once each, in one line without file paths;
    send libraries' deprecation notices (transformers' ``past_key_values``, ...) to :func:`warnings_log`."""
    seen: set[tuple[str, str]] = set()

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
             line: str | None = None) -> None:
        text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
        if issubclass(category, _LIBRARY_NOISE) and not issubclass(category, FisWarning):
            try:
                log = warnings_log()
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a", encoding="utf-8") as fh:
                    fh.write(f"{category.__name__}: {text} ({filename}:{lineno})\n")
            except OSError:
                pass
            return
        key = (category.__name__, text)
        if key in seen:
            return
        seen.add(key)
        label = "" if issubclass(category, FisWarning) else f"{_plain_name(category)}: "
        print(f"warning: {label}{text}", file=sys.stderr)

    warnings.simplefilter("always")  # dedup is ours (by message), not per source line
    warnings.showwarning = show


def _plain_name(category: type[Warning]) -> str:
    """'ConvergenceWarning' -> 'convergence', 'ValueWarning' -> 'value' (the library's class name, in words)."""
    name = category.__name__.removesuffix("Warning") or "warning"
    return re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower()


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _register()
    with warnings.catch_warnings():
        _route_warnings()
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        app(args=argv, standalone_mode=False, prog_name="fis")
    except FisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as err:
        err.show()
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m fis_interventions.cli`
    # commands register on the imported module's `app`, not on this __main__ copy: run that one
    from fis_interventions.cli import main as _main

    sys.exit(_main())
