"""The one error hierarchy of mgaudit.

Library code raises these; the CLI turns them into a one-line message and an exit
code at a single boundary (``mgaudit.commands.boundary``). Anything else that escapes
is a bug: exit code 3, one line, and the traceback under ``--debug``.
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

    @property
    def params(self) -> list[str]:
        """The parameters the message and hint name (library messages write them as ```name```;
        the CLI shows them as its flags)."""
        import re

        return list(dict.fromkeys(re.findall(r"`([a-z][a-z0-9_]*)`", self.one_line())))


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


class NoFlipsError(TraceError):
    """The traces hold no flip, so a recall threshold cannot be fitted (the bound method still can).

    ``steps``: synchronous steps read; ``label``: which traces.
    """

    def __init__(self, message: str, *, steps: int, label: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.steps = steps
        self.label = label


class OutputError(MgauditError):
    """An output location cannot be written."""


class GateError(InputError):
    """A gate file is missing or malformed."""


class GateMismatchError(GateError):
    """A gate was fitted on another stack (model, dtype, device kind, attention) and strict checking is on.

    ``mismatches``: ``{field: (gate value, this run's value)}``.
    """

    def __init__(self, message: str, *, mismatches: dict[str, tuple], hint: str | None = None):
        super().__init__(message, hint=hint)
        self.mismatches = mismatches


class ContextLengthError(PromptError):
    """A prompt plus the tokens to generate does not fit the model's context."""

    def __init__(self, message: str, *, prompt_id: str, prompt_tokens: int, max_new_tokens: int, context: int,
                 too_long: int = 1, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.prompt_id = prompt_id
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context = context
        self.too_long = too_long  # how many prompts of the set are too long


class ResourceError(UsageError):
    """The requested work cannot fit in the memory available (estimated before decoding)."""

    def __init__(self, message: str, *, needed_bytes: int, available_bytes: int, batch_size: int,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes
        self.batch_size = batch_size


class HubUnavailableError(InputError):
    """The Hugging Face Hub cannot be reached (or offline mode is set) and nothing usable is cached."""

    def __init__(self, message: str, *, what: str, offline: bool, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.what = what
        self.offline = offline


class HubDatasetUnavailableError(HubUnavailableError, PromptError):
    """An ``hf:`` prompt set needs the Hub, which cannot be used now."""


class HubModelUnavailableError(HubUnavailableError, ModelError):
    """A Hub model id needs the Hub, which cannot be used now."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (CI cancellation). Raised like KeyboardInterrupt so that atomic writes drop
    the unit in progress; the CLI exits 143 (128 + SIGTERM)."""


#: Exit codes of the CLI: 0 success (verify: all identical), 1 verify found sequences that differ
#: (every difference within noise, or not classified), 2 bad input (any MgauditError), 3 internal
#: error (a bug: anything else), 4 verify found an anomalous difference, 130/143 interrupted.
EXIT_OK, EXIT_DIFFER, EXIT_INPUT, EXIT_INTERNAL, EXIT_ANOMALOUS = 0, 1, 2, 3, 4
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def json_error_text(exc, with_line: bool = True) -> str:
    """A JSONDecodeError in words: "Expecting value at line 1, column 5". (Its ``msg`` can end in
    "at", as in "Unterminated string starting at": that word is not repeated.)"""
    msg = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
    return f"{msg} at line {exc.lineno}, column {exc.colno}" if with_line else f"{msg} at column {exc.colno}"
