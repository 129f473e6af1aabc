"""The ``fis`` command. Each subcommand is a thin wrapper over a Python API function of the same name.

User errors (:class:`FisError`) print one line on stderr and exit with code 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys

import click
import typer

from .errors import FisError

app = typer.Typer(help="fis-interventions: joint SAEs, factorial designs, interventions and statistics.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
model_app = typer.Typer(help="Inspect models.", no_args_is_help=True)
app.add_typer(model_app, name="model")


def _register() -> None:
    """Import the modules that add their commands to ``app`` (kept lazy-light: heavy imports live inside)."""
    from . import commands  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _register()
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
