"""Where output goes: results to stdout, progress and diagnostics to stderr (rich)."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(highlight=False)  # results
err = Console(stderr=True, highlight=False)  # progress, diagnostics


def print_json(obj: Any) -> None:
    """Machine output: plain JSON on stdout, no rich markup (objects with ``to_dict`` as that)."""
    if hasattr(obj, "to_dict"):
        obj = obj.to_dict()
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def progress(transient: bool = False) -> Progress:
    """A progress bar on stderr; silent when stderr is not a terminal and quiet is asked."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
    )


# --------------------------------------------------------------------------- progress and log lines

#: Without a terminal, at most one progress line per stage every this many seconds (first and last always).
PLAIN_INTERVAL = 10.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fail(line: str, code: int, as_json: bool) -> None:
    """Report an error (one line on stderr; ``{"error", "exit_code"}`` on stdout under --json) and exit."""
    say(line)
    if as_json:
        print_json({"error": line, "exit_code": code})
    raise typer.Exit(code)


def say(message: str) -> None:
    """One plain line on stderr: no markup, no wrapping (CI logs keep it whole)."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def logger(quiet: bool = False):
    """The ``log`` callback for library calls: every line on stderr; under ``quiet`` only warnings."""
    def log(message: str) -> None:
        if not quiet or message.lower().startswith("warning"):
            say(message)
    return log


class ProgressReporter:
    """Renders the library's progress events (:mod:`mgaudit.progress`) on stderr.

    On a terminal: a rich progress bar. Otherwise (CI logs): plain lines, the first
    and last of each stage and at most one every ``interval`` seconds in between, each
    with the elapsed time and an ETA. ``quiet``: nothing.
    """

    def __init__(self, quiet: bool = False, tty: bool | None = None, interval: float = PLAIN_INTERVAL,
                 clock: Any = None):
        import time

        self.quiet = quiet
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock or time.monotonic
        self.bar: Progress | None = None
        self._adapter: Any = None
        self._started: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def __enter__(self) -> "ProgressReporter":
        if self.tty and not self.quiet:
            from ..progress import as_callback

            self.bar = progress()
            self.bar.start()
            self._adapter = as_callback(self.bar)
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        return False

    def __call__(self, event: Any) -> None:
        if self.quiet:
            return
        if self._adapter is not None:
            self._adapter(event)
            return
        now = self.clock()
        if event.done == 0:  # a stage (re)starts: e.g. verify's solo reference after scan's
            self._started[event.stage] = now
            self._last.pop(event.stage, None)
        start = self._started.setdefault(event.stage, now)
        last = self._last.get(event.stage)
        final = event.done >= event.total
        if last is not None and not final and now - last < self.interval:
            return
        self._last[event.stage] = now
        elapsed = now - start
        line = f"progress: {event.label} {event.done}/{event.total} {event.unit}, {_clock(elapsed)} elapsed"
        if 0 < event.done < event.total:
            line += f", ETA {_clock(elapsed / event.done * (event.total - event.done))}"
        elif final:
            line += ", done"
        say(line)


def reporter(quiet: bool = False) -> ProgressReporter:
    """``with console.reporter(quiet) as report: library_call(..., progress=report)``."""
    return ProgressReporter(quiet=quiet)
