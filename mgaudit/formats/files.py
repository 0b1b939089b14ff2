"""Files on disk, the one place that writes them: atomic writes through a temporary file in the
target folder, the names of those temporary files (and finding the ones an interrupted write
left), and the checks that an output path can be written before any work starts.

A temporary file is named ``.tmp-<name>.<random>.partial``: no ``*.parquet`` or ``*.json``
glob matches it, so a reader never sees a half-written file, and a resumed run deletes
leftovers (:func:`stale_temp_files`). Results get the usual permissions (0666 minus the umask).
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from ..errors import OutputError

TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".partial"


def _open_new(path: Path) -> int:
    """Create ``path`` exclusively with mode 0666 minus the umask (``mkstemp`` would give 0600)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def temp_path(path: Path) -> Path:
    return path.parent / f"{TMP_PREFIX}{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        fd = _open_new(tmp)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}", hint="choose a writable location") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def stale_temp_files(folder: Path) -> list[Path]:
    """Temporary files an interrupted write left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(TMP_PREFIX) and p.name.endswith(TMP_SUFFIX) and p.is_file())


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` (an existing directory) cannot take a new file, or None where it can: a
    temporary file is created there and removed at once."""
    trial = folder / f"{TMP_PREFIX}write-test.{os.getpid()}.{secrets.token_hex(3)}{TMP_SUFFIX}"
    try:
        os.close(_open_new(trial))
        os.unlink(trial)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: Path, what: str) -> None:
    """Raise OutputError unless ``path`` is (or can be created as) a writable directory.

    Creates nothing. ``what`` names the output in the message ("trace directory", ...).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory", hint="give a directory path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory", hint="give a path under a directory")
    why = _unwritable(base)
    if why:
        raise OutputError(f"{what} {path}: {base} is not writable ({why})", hint="choose a writable location")


def check_output_file(path: Path, what: str) -> None:
    """Raise OutputError unless a file can be written at ``path`` (its folder may not exist yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a directory", hint="give a file path")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"{what} {path}: {base} is a file, not a directory", hint="give a path under a directory")
    why = _unwritable(base)
    if why:
        raise OutputError(f"{what} {path}: {base} is not writable ({why})", hint="choose a writable location")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file exists and is read-only", hint="choose a writable location")


def make_dir(path: Path, what: str) -> None:
    """Create the output directory ``path`` (and its parents); OutputError naming ``what`` if it cannot."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {path}: cannot create it ({exc.strerror or exc})",
                          hint="choose a writable directory") from exc
