"""The single place where library errors become CLI messages and exit codes.

Exit codes: 0 success; 1 ``verify`` found sequences that differ from solo; 2 bad
input (every :class:`~mgaudit.errors.MgauditError`); 3 internal error (anything
else: a bug); 130 interrupted (SIGINT), 143 terminated (SIGTERM). Every error is
one line on stderr (``error: ...``); under ``--json`` the same also goes to stdout
as ``{"error": ..., "exit_code": ...}``. ``--debug`` re-raises with the traceback.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import signal
import threading
from typing import Any, Callable


from .console import fail
from ..errors import (EXIT_INTERNAL, EXIT_SIGINT, EXIT_SIGTERM, ContextLengthError, HubUnavailableError,
                      MgauditError, ResourceError, Terminated)
from .clihelp import CLICK_FLOW

#: Hints that name CLI flags: the library's errors carry data, the CLI says which flag helps.
CLI_HINTS: dict[type, str] = {
    ContextLengthError: "shorten the prompt, lower --max-new-tokens, or pass --skip-long to skip such prompts",
    ResourceError: "use a smaller batch size or a lower --max-new-tokens",
    HubUnavailableError: "give a local prompts file or model directory instead",
}

#: Keyword names under which commands take their --json flag.
JSON_FLAGS = ("json_out", "as_json")

_debug = {"on": False}


def set_debug(on: bool) -> None:
    _debug["on"] = on


def debug_enabled() -> bool:
    return _debug["on"] or os.environ.get("MGAUDIT_DEBUG", "") not in ("", "0")


def error_line(exc: MgauditError) -> str:
    """The one line shown for a library error, with the CLI's hint where it has one, and the
    parameters it names (```batch_size```) as this CLI's flags (``--batch-size``)."""
    for cls, hint in CLI_HINTS.items():
        if isinstance(exc, cls):
            return as_flags(f"{exc.message} ({hint})")
    return as_flags(exc.one_line())


#: How library messages name a parameter: its Python name between backquotes.
_PARAM = re.compile(r"`([a-z][a-z0-9_]*)`")
#: Where the CLI's long options come from (set by the app that owns this boundary: ``use_flags``).
_flag_source: dict[str, Any] = {"provider": None, "flags": None}


def use_flags(provider: Callable[[], set[str]]) -> None:
    """Name the CLI's long options: ``provider()`` returns them (called once, on the first error)."""
    _flag_source.update(provider=provider, flags=None)


def known_flags() -> set[str]:
    """Every long option of the CLI (empty where no app named them)."""
    if _flag_source["flags"] is None:
        provider = _flag_source["provider"]
        _flag_source["flags"] = set(provider()) if provider is not None else set()
    return _flag_source["flags"]


def as_flags(text: str) -> str:
    """``text`` with each backquoted parameter name that is a flag of this CLI written as that flag;
    other backquoted names lose their quotes."""
    flags = known_flags()

    def flag(m: re.Match) -> str:
        name = "--" + m.group(1).replace("_", "-")
        return name if name in flags else m.group(1).replace("_", " ")

    return _PARAM.sub(flag, text)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def guarded(fn: Callable[..., Any] | None = None, *, on_interrupt: str | None = None) -> Any:
    """Wrap a command: errors become one line and an exit code (see the module doc).

    ``on_interrupt``: what to tell the user after SIGINT/SIGTERM; by default commands
    with a ``resume`` parameter suggest --resume, others only say the run stopped.
    Usable as ``@guarded`` or ``@guarded(on_interrupt=...)``.
    """
    if fn is None:
        return functools.partial(guarded, on_interrupt=on_interrupt)
    resumable = "resume" in inspect.signature(fn).parameters
    hint = on_interrupt or ("files written so far are complete; rerun with --resume to continue" if resumable
                            else "nothing more was written")

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = any(bool(kwargs.get(k)) for k in JSON_FLAGS)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except CLICK_FLOW:
            raise
        except MgauditError as exc:
            if debug_enabled():
                raise
            fail("error: " + error_line(exc), exc.exit_code, as_json)
        except KeyboardInterrupt as exc:  # Terminated (SIGTERM) is one too
            if debug_enabled():
                raise
            term = isinstance(exc, Terminated)
            fail(f"{'terminated (SIGTERM)' if term else 'interrupted'}: {hint}",
                 EXIT_SIGTERM if term else EXIT_SIGINT, as_json)
        except Exception as exc:  # a bug: never exit 1, which means "sequences differ"
            if debug_enabled():
                raise
            text = " ".join(str(exc).split())
            text = text if len(text) <= 200 else text[:197] + "..."
            fail(f"error: internal error: {type(exc).__name__}{': ' + text if text else ''} "
                 "(a bug in mgaudit; rerun with --debug for the traceback)", EXIT_INTERNAL, as_json)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return wrapper
