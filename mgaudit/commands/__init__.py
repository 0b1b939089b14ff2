"""CLI commands, one module each. ``register_all`` adds them to the app."""

from __future__ import annotations

import importlib

import typer

COMMAND_MODULES = ["scan", "calibrate", "verify", "model", "demo", "diagnose", "bench", "server"]


def register_all(app: typer.Typer) -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(app)
