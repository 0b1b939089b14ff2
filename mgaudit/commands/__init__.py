"""CLI commands, one module each. ``register_all`` adds them to the app, in this order."""

from __future__ import annotations

import typer


def register_all(app: typer.Typer) -> None:
    # explicit imports: a missing or broken command module is an error, never silently skipped
    from . import calibrate, demo, diagnose, model, scan, server, verify

    for module in (scan, calibrate, verify, model, demo, diagnose, server):
        module.register(app)
