"""Progress reporting from the library: a callback that receives :class:`ProgressEvent`.

The library never draws anything; it calls ``progress(event)`` and the caller (the
CLI, see :mod:`mgaudit.commands.console`) decides how to show it: a bar on a terminal, plain
lines in a CI log, or nothing. Older callers passed a ``rich.progress.Progress``;
:func:`as_callback` still accepts one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` items of one stage are finished.

    ``stage`` is a stable key ("solo", "batched", "policy"); ``label`` is what to show
    (it may change within a stage, e.g. with the batch size); ``unit`` names the items.
    Each stage first reports ``done == 0``.
    """

    stage: str
    label: str
    done: int
    total: int
    unit: str = "items"


ProgressCallback = Callable[[ProgressEvent], None]


def _noop(event: ProgressEvent) -> None:
    return None


def as_callback(progress: Any) -> ProgressCallback:
    """A progress callback from ``None``, a callable, or a ``rich.progress.Progress``."""
    if progress is None:
        return _noop
    if hasattr(progress, "add_task") and hasattr(progress, "update"):
        return _RichAdapter(progress)
    if callable(progress):
        return progress
    raise TypeError(f"progress must be a callable or a rich Progress, not {type(progress).__name__}")


class _RichAdapter:
    """Feeds events into a rich Progress: one task per stage."""

    def __init__(self, bar: Any):
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def __call__(self, event: ProgressEvent) -> None:
        task: Optional[Any] = self.tasks.get(event.stage)
        if task is None or event.done == 0:  # a stage that starts again gets a new bar
            task = self.tasks[event.stage] = self.bar.add_task(event.label, total=event.total)
        self.bar.update(task, completed=event.done, total=event.total, description=event.label)


class Stage:
    """Counts items of one stage and reports each step: ``Stage(cb, "solo", "solo reference", n)``."""

    def __init__(self, callback: ProgressCallback, stage: str, label: str, total: int, unit: str = "items"):
        self.callback, self.stage, self.label, self.total, self.unit = callback, stage, label, total, unit
        self.done = 0
        if total:
            self._emit()

    def _emit(self) -> None:
        self.callback(ProgressEvent(self.stage, self.label, self.done, self.total, self.unit))

    def advance(self, n: int = 1, label: str | None = None) -> None:
        self.done += n
        if label is not None:
            self.label = label
        self._emit()

    def relabel(self, label: str) -> None:
        if label != self.label:
            self.label = label
            self._emit()
