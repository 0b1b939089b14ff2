"""The JSON documents mgaudit writes for people and CI (the verify report, a server's card): a
frozen dataclass with ``format`` and ``version`` fields, read back with checks, and read like its
JSON (a read-only mapping of its fields)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, Iterator

from ..errors import InputError, json_error_text


class Document(Mapping):
    """Base of a frozen dataclass document whose last fields are ``format`` and ``version`` (their
    defaults are what it reads); subclasses name themselves in ``WHAT`` ("verify report")."""

    WHAT: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write_json(self, path: Path) -> None:
        from .files import atomic_write_json

        atomic_write_json(Path(path), self.to_dict())

    @classmethod
    def read(cls, path: Path):
        """The document at ``path``; InputError (one line) where it is unreadable, not such a
        document, or of another version."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{path}: cannot read the {cls.WHAT} ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({json_error_text(exc)})") from None
        fmt, version = (cls.__dataclass_fields__[k].default for k in ("format", "version"))
        if not isinstance(data, dict) or data.get("format") != fmt:
            raise InputError(f"{path}: not an mgaudit {cls.WHAT}")
        if data.get("version") != version:
            raise InputError(f"{path}: unsupported {cls.WHAT} version {data.get('version')!r} "
                             f"(this mgaudit reads {version})")
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
