"""The ``fis`` command. Each subcommand is a thin wrapper over a Python API function of the same name.

User errors (:class:`FisError`) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import sys
import warnings
from pathlib import Path

import typer

from .errors import FisError, FisWarning

try:  # typer >= 0.2x vendors its own click (`typer._click`); its exceptions are not `click`'s
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer runs on the installed click
    import click  # type: ignore[no-redef]

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
            except (OSError, FisError):  # an unwritable or bad $FIS_CACHE must not break the command
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


# typer's own Exit/Abort (vendored click) and click's (older typer: the same classes)
_EXITS = tuple({typer.Exit, getattr(click.exceptions, "Exit", typer.Exit)})
_ABORTS = tuple({typer.Abort, getattr(click.exceptions, "Abort", typer.Abort)})
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; older click printed help itself


def usage_error_line(err: Exception) -> str:
    """One line for a usage error (unknown option, missing argument, bad value), naming the command whose
    ``--help`` lists the right flags: 'error: No such option: --bogus (see fis stats --help)'."""
    message = " ".join(err.format_message().split()) if hasattr(err, "format_message") else str(err)
    ctx = getattr(err, "ctx", None)
    where = f" (see {ctx.command_path} --help)" if ctx is not None and ctx.command_path else ""
    return f"error: {message}{where}"


def _run(argv: list[str] | None) -> int:
    try:
        app(args=argv, standalone_mode=False, prog_name="fis")
    except FisError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except _EXITS as err:
        return err.exit_code
    except _ABORTS:
        print("aborted", file=sys.stderr)
        return 130
    except _NO_ARGS as err:  # `fis`, `fis model`: the help is the answer
        err.show()
        return 2
    except click.ClickException as err:
        print(usage_error_line(err), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as err:  # disk full, read-only folder, locked file, name too long: one line, no traceback
        from .io import fault_line

        fault = fault_line(err)
        if fault is None:
            raise
        print(f"error: {fault[0]}", file=sys.stderr)
        return fault[1]
    except sqlite3.OperationalError as err:  # SQLite reports disk full / read-only / locked in its own words
        print(f"error: results store: {err}; nothing was half-written, rerun the same command to resume "
              "(fix: free space, make the folder writable, or close the program holding the store)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m fis_interventions.cli`
    # commands register on the imported module's `app`, not on this __main__ copy: run that one
    from fis_interventions.cli import main as _main

    sys.exit(_main())
