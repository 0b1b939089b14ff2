#!/usr/bin/env python3
"""Lint the prose of the code and the docs: no doubled words ("the the", "at at").

Run by .ci/run before the tests; exits 1 naming each file and word found.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOUBLED = re.compile(r"\b(at|the|a|to|of|is|in|and|on|for|with) \1\b")


def main() -> int:
    files = sorted((REPO / "mgaudit").rglob("*.py")) + [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    bad = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            bad += [f"{f.relative_to(REPO)}:{n}: doubled word {m.group(0)!r}" for m in DOUBLED.finditer(line)]
    print("\n".join(bad) or f"lint: {len(files)} files, no doubled words")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
