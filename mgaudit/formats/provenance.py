"""The provenance block of every artifact mgaudit writes (traces, scan manifests, reports): what
was run (model or engine, with versions and device: ``LoadedModel.provenance`` or the endpoint's),
on which prompts, with which configuration, by which mgaudit, and when. Built here only."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def now() -> str:
    """The creation time artifacts record (UTC, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def config_dict(config: Any) -> dict[str, Any]:
    """A run configuration (a dataclass) as JSON-ready values (paths as strings)."""
    items = asdict(config).items() if is_dataclass(config) else dict(config).items()
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in items}


def run_provenance(stack: dict[str, Any], prompt_set, config: Any, *, count: int | None = None,
                   prompts_extra: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """``stack`` (model or engine provenance) plus the prompts, the configuration, the mgaudit
    version and the creation time; ``extra`` keys go in as given."""
    from .. import __version__

    prompts = {"source": prompt_set.source, "name": prompt_set.name, "sha256": prompt_set.sha256,
               "count": len(prompt_set.prompts) if count is None else count, **(prompts_extra or {})}
    return {**stack, "prompts": prompts, "config": config_dict(config), **extra,
            "mgaudit_version": __version__, "created": now()}
