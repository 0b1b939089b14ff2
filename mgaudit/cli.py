"""The command line: a thin layer over the library.

Each command module under ``mgaudit.commands`` parses options into a config
dataclass, calls one library function and renders the result. Errors become
messages at one boundary, :func:`mgaudit.commands.boundary.guarded`: an
MgauditError is one line on stderr and its exit code (2 for bad input), with a
traceback only under ``--debug`` or ``MGAUDIT_DEBUG=1``.
"""

from __future__ import annotations

import typer

from . import __version__
from .commands import register_all
from .commands.boundary import set_debug

app = typer.Typer(
    name="mgaudit",
    help="Audit batch-dependent nondeterminism in greedy LLM decoding: scan, calibrate, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mgaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (or set MGAUDIT_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    set_debug(debug)


register_all(app)


def run() -> None:  # console script
    app()
