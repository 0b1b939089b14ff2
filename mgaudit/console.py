"""Where output goes: results to stdout, progress and diagnostics to stderr (rich)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(highlight=False)  # results
err = Console(stderr=True, highlight=False)  # progress, diagnostics


def print_json(obj: Any) -> None:
    """Machine output: plain JSON on stdout, no rich markup."""
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
