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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .document import Document

REPORT_FORMAT = "mgaudit.verify"
REPORT_VERSION = 2


@dataclass(frozen=True)
class VerifyReport(Document):
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

    WHAT: ClassVar[str] = "verify report"

    def write(self, path: Path) -> None:
        self.write_json(path)
