"""Help and usage conventions of the CLI, in one place.

* usage errors from click (a bad integer, an unknown option, a missing argument)
  are one line like every other error, exit 2, and a JSON object on stdout under
  ``--json``;
* arguments show their metavar (``PROMPTS``) in the usage line and the help panel,
  not ``{prompts}`` or ``<str>``.
"""

from __future__ import annotations

from typing import Any

import click
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import DefaultPlaceholder

from ..errors import EXIT_INPUT


def _exception_classes(name: str) -> tuple[type, ...]:
    """``name`` from click and from the click that typer vendors (typer >= 0.20 ships its own)."""
    found: list[type] = []
    modules = [click.exceptions]
    try:
        from typer.core import _click as vendored  # type: ignore[attr-defined]

        modules.append(vendored.exceptions)
    except (ImportError, AttributeError):
        pass
    for m in modules:
        cls = getattr(m, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


USAGE_ERRORS = _exception_classes("UsageError")
NO_ARGS_IS_HELP = _exception_classes("NoArgsIsHelpError")
#: Exceptions click itself turns into exits: commands let them through.
CLICK_FLOW = tuple(dict.fromkeys((typer.Exit, typer.Abort) + _exception_classes("Exit") + _exception_classes("Abort")
                                  + _exception_classes("ClickException")))


class _Argument(TyperArgument):
    """An argument shown by its metavar: ``PROMPTS`` (required) or ``[PROMPTS]``."""

    def _name(self) -> str:
        return self.metavar or (self.name or "ARG").upper()

    def display_type_rich(self, ctx: click.Context) -> str | None:
        return ""

    def _rich_display_name(self) -> str:
        return self._name() + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        name = self._name() + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


#: Placeholders for options without an explicit metavar, by typer's type label.
_TYPE_METAVARS = {"int": "N", "float": "NUMBER", "str": "TEXT", "path": "PATH", "Path": "PATH"}


class _Option(TyperOption):
    """An option shown by its metavar; on/off flags show none (not ``<bool>``)."""

    def display_type_rich(self, ctx: click.Context) -> str | None:
        if self.metavar is not None:
            return self.metavar
        if self.is_flag or self.count:
            return ""
        label = (self.display_type(ctx) or "").strip("<>")
        label = label[5:-1] if label.startswith("list[") else label
        return _TYPE_METAVARS.get(label, label.upper())


def _restyle(params: list) -> None:
    for p in params:
        if type(p) is TyperArgument:
            p.__class__ = _Argument
        elif type(p) is TyperOption:
            p.__class__ = _Option


class MgauditCommand(TyperCommand):
    """A command whose arguments and options render by metavar (see :class:`_Argument`, :class:`_Option`)."""

    def get_params(self, ctx: click.Context) -> list:
        params = super().get_params(ctx)
        _restyle(params)
        return params


class MgauditGroup(TyperGroup):
    """The root group: click's usage errors become one line (and JSON under --json), exit 2."""

    def get_params(self, ctx: click.Context) -> list:
        params = super().get_params(ctx)
        _restyle(params)
        return params

    def invoke(self, ctx: click.Context) -> Any:
        raw = [*getattr(ctx, "_protected_args", []), *ctx.args]
        try:
            return super().invoke(ctx)
        except NO_ARGS_IS_HELP:
            raise
        except USAGE_ERRORS as exc:
            from .console import fail

            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            message = " ".join(exc.format_message().split()).rstrip(".")
            fail(f"error: {message} (see `{where} -h`)", EXIT_INPUT, "--json" in raw)


def apply_command_class(app: typer.Typer) -> None:
    """Give every command of ``app`` (and of its sub-apps) the :class:`MgauditCommand` class."""
    for info in app.registered_commands:
        if info.cls is None or info.cls is TyperCommand:
            info.cls = MgauditCommand
    for group in app.registered_groups:
        if group.cls is None or isinstance(group.cls, DefaultPlaceholder):
            group.cls = MgauditGroup
        if group.typer_instance is not None:
            apply_command_class(group.typer_instance)
