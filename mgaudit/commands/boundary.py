"""The single place where library errors become CLI messages and exit codes."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import typer

from rich.markup import escape

from ..console import err
from ..errors import MgauditError

_debug = {"on": False}


def set_debug(on: bool) -> None:
    _debug["on"] = on


def debug_enabled() -> bool:
    return _debug["on"] or os.environ.get("MGAUDIT_DEBUG", "") not in ("", "0")


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: MgauditError -> one line on stderr + its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MgauditError as exc:
            if debug_enabled():
                raise
            err.print("[bold red]error:[/] " + escape(exc.one_line()), soft_wrap=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: files written so far are complete; rerun with --resume to continue")
            raise typer.Exit(130) from None

    return wrapper
