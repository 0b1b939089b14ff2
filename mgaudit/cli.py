"""The command line: a thin layer over the library.

Each command module under ``mgaudit.commands`` parses options into a config
dataclass, calls one library function and renders the result. Errors become
messages at one boundary, :func:`mgaudit.commands.boundary.guarded`: an
MgauditError is one line on stderr and its exit code (2 for bad input), anything
else exit code 3 (an internal error), with a traceback only under ``--debug`` or
``MGAUDIT_DEBUG=1``.
"""

from __future__ import annotations

import typer

from . import __version__
from .commands import register_all
from .commands.boundary import set_debug, use_flags
from .commands.clihelp import MgauditGroup, apply_command_class

#: Exit codes, as documented in ``--help`` and docs/ci.md.
EXIT_CODES = (
    ("0", "success (verify: every sequence identical to its reference)"),
    ("1", "verify: some sequences differ, every difference within noise (or no threshold to tell)"),
    ("2", "bad input: a file, flag, model or server that cannot be used (one line on stderr)"),
    ("3", "internal error: a bug in mgaudit (--debug shows the traceback)"),
    ("4", "verify: some difference is anomalous (the reference's margin >= tau: rounding cannot explain it)"),
    ("130/143", "interrupted by SIGINT/SIGTERM"),
)

#: Every environment variable mgaudit reads.
ENV_VARS = (
    ("MGAUDIT_CACHE", "where the default model, the probe results, the reference runs and llama-server are cached (default ~/.cache/mgaudit)"),
    ("MGAUDIT_API_KEY", "the API key sent to --endpoint/--reference servers (or OPENAI_API_KEY)"),
    ("OPENAI_API_KEY", "the API key sent to servers where MGAUDIT_API_KEY is unset"),
    ("MGAUDIT_DEBUG", "1: show tracebacks, like --debug"),
    ("MGAUDIT_NO_PROBE_CACHE", "1: do not reuse the cached invariance probe of the ragged path"),
    ("HF_HUB_OFFLINE", "1: never contact the Hugging Face Hub (hf: datasets and Hub models from the local cache only)"),
    ("HF_DATASETS_OFFLINE", "1: the same, as the datasets library spells it"),
    ("TRANSFORMERS_OFFLINE", "1: the same, as transformers spells it"),
    ("HF_ENDPOINT", "the Hub address checked before Hub downloads (default https://huggingface.co)"),
    ("HF_HOME", "the Hugging Face cache that Hub models and hf: datasets are read from"),
    ("TRANSFORMERS_SDPA_FORCE_GQA", "1: the ragged path uses SDPA's GQA mode"),
    ("TQDM_DISABLE", "saved and restored: mgaudit sets it while converting a GGUF file"),
)


def _epilog() -> str:
    codes = "; ".join(f"{c} {what}" for c, what in EXIT_CODES)
    env = "; ".join(f"{name}: {what}" for name, what in ENV_VARS)
    return f"Exit codes: {codes}.\n\nEnvironment: {env}."


app = typer.Typer(
    name="mgaudit",
    cls=MgauditGroup,
    help="Audit batch-dependent nondeterminism in greedy LLM decoding: scan, calibrate, verify.",
    epilog=_epilog(),
    no_args_is_help=True,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def version_text() -> str:
    """mgaudit, torch and transformers versions, the device ``--device auto`` picks, and the machine
    (:func:`mgaudit.machine.describe`: CPU, its ISA family, cores)."""
    import platform

    import torch
    import transformers

    from .machine import describe

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} device(s))"
    return "\n".join([
        f"mgaudit {__version__}",
        f"torch {torch.__version__}",
        f"transformers {transformers.__version__}",
        f"python {platform.python_version()}",
        f"device {device}",
        f"cpu {describe()}",
    ])


def _version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", metavar="", help="Show tracebacks on errors (or set MGAUDIT_DEBUG=1)."),
    version: bool = typer.Option(False, "--version", "-V", metavar="", callback=_version, is_eager=True,
                                 help="Print the versions of mgaudit, torch and transformers, the device and CPU."),
) -> None:
    set_debug(debug)


register_all(app)
apply_command_class(app)


def long_options() -> set[str]:
    """Every long option of every command of the app (the boundary writes parameter names as these)."""
    import click

    found: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            found.update(o for o in p.opts if o.startswith("--"))
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return found


use_flags(long_options)


def run() -> None:  # console script
    """``app()``, and a last guard: an exception that escapes outside a command (while the app is built
    or its options parsed) is an internal error too, exit 3, never 1."""
    import sys

    from .commands.boundary import debug_enabled
    from .errors import EXIT_INTERNAL

    try:
        app()
    except Exception as exc:
        if debug_enabled():
            raise
        sys.stderr.write(f"error: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
                         "(a bug in mgaudit; rerun with --debug for the traceback)\n")
        sys.exit(EXIT_INTERNAL)
