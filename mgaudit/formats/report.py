"""The verify report (``verify --report FILE`` and ``verify()``'s result), one schema for every
backend: its fields, written atomically and read back with checks in this module only.

* ``candidate``: what was checked (backend, condition, policy and threshold, or server);
* ``reference``: what it was checked against (backend alone, contract, where its runs came from);
* ``summary``: identical sequences, the teacher-forced comparison, the severity of the
  differences (counts with 95 % intervals, margin histogram, worst cases, where tau came
  from), timings, and for local policies the checks, audits and the exactness statement;
* ``sequences``: one record per prompt, with both full token lists (``reference_tokens``,
  ``candidate_tokens``) and, where they part, both tokens, texts, margins and the severity;
* ``differences``: every step that differs (the free-running first divergence of each
  sequence, and each teacher-forced flip), with both margins and a severity;
* ``drift``, ``probe``: a local policy's drift events and the invariance probe's evidence;
* ``provenance``: both stacks, the prompts, the configuration, versions and time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, json_error_text

REPORT_FORMAT = "mgaudit.verify"
REPORT_VERSION = 2


@dataclass(frozen=True)
class VerifyReport(Mapping):
    """What ``verify`` checked (see the module doc). Read-only; also a mapping of its fields
    (``report["summary"]``), as its JSON form reads."""

    candidate: dict[str, Any]
    reference: dict[str, Any]
    summary: dict[str, Any]
    sequences: list[dict[str, Any]]
    differences: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = REPORT_FORMAT
    version: int = REPORT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write(self, path: Path) -> None:
        from .files import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def read(cls, path: Path) -> "VerifyReport":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read the report ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({json_error_text(exc)})") from None
        if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
            raise InputError(f"{path}: not an mgaudit verify report")
        if data.get("version") != REPORT_VERSION:
            raise InputError(f"{path}: unsupported report version {data.get('version')!r} "
                             f"(this mgaudit reads {REPORT_VERSION})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # a read-only mapping of the fields
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)
