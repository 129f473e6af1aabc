"""User-facing errors.

Anything the *user* got wrong (a malformed YAML, a missing column, an unknown hook point, a checkpoint for
another model) raises :class:`FisError`. The CLI turns it into one line on stderr and exit code 2, with no
traceback; library callers can catch it like any exception. Bugs stay ordinary exceptions.
"""

from __future__ import annotations

from pathlib import Path


class FisError(Exception):
    """A problem with the user's input, reported as one line: where, what, and how to fix it."""

    def __init__(self, message: str, *, source: str | Path | None = None, field: str | None = None,
                 fix: str | None = None) -> None:
        self.source = str(source) if source is not None else None
        self.field = field
        self.fix = fix
        self.detail = message
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.source:
            where = self.source
        if self.field:
            where = f"{where}: {self.field}" if where else self.field
        text = f"{where}: {self.detail}" if where else self.detail
        if self.fix:
            text = f"{text} (fix: {self.fix})"
        return text.replace("\n", " ")


class FisWarning(UserWarning):
    """A problem that does not stop the run but must be reported (unbalanced cells, split words, ...)."""
