"""The one error hierarchy of mgaudit.

Library code raises these; the CLI turns them into a one-line message and an exit
code at a single boundary (``mgaudit.cli``). Anything else that escapes is a bug
and is shown with a traceback.
"""

from __future__ import annotations


class MgauditError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(MgauditError):
    """A flag or option has a bad value."""


class InputError(MgauditError):
    """A file the user gave us is missing, unreadable or malformed."""


class PromptError(InputError):
    """A prompt set cannot be read or is empty."""


class ModelError(InputError):
    """A model cannot be found or loaded."""


class TraceError(InputError):
    """Trace files are missing, of the wrong schema, or unfit for the job."""


class OutputError(MgauditError):
    """An output location cannot be written."""


class GateError(InputError):
    """A gate file is missing or malformed."""
