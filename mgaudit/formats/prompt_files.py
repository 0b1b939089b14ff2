"""Prompt files: the record a prompt is (:class:`Prompt`), and reading ``.jsonl``, ``.jsonl.gz``,
``.json``, ``.parquet``, ``.csv`` and ``.txt`` files of them, in this module only.

JSONL/JSON records carry ``prompt`` (or ``text``) or ``messages`` (a chat list), and optionally
``id``; CSV and Parquet the same columns; a ``.txt`` file holds one prompt per non-empty line.
Every problem is a :class:`~mgaudit.errors.PromptError` with a one-line message that names the
file (and line or field) and says what to do.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PromptError, json_error_text

#: File endings ``load_prompts`` reads, longest first so ``.jsonl.gz`` wins over ``.gz``.
ACCEPTED_EXTENSIONS = (".jsonl.gz", ".jsonl", ".json", ".parquet", ".csv", ".txt")


@dataclass(frozen=True)
class Prompt:
    """One prompt: either a plain ``text`` or a chat ``messages`` list, never both."""

    id: str
    text: str | None
    messages: list[dict] | None

    def as_messages(self) -> list[dict]:
        """The prompt as a chat list (a plain text becomes one user turn)."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.text or ""}]

    def as_text(self) -> str:
        """The prompt as plain text (chat contents joined with newlines)."""
        if self.text is not None:
            return self.text
        return "\n".join(str(m.get("content", "")) for m in (self.messages or []))


def reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def file_ext(path: Path) -> str | None:
    low = path.name.lower()
    for ext in ACCEPTED_EXTENSIONS:
        if low.endswith(ext):
            return ext
    return None


def file_stem(path: Path) -> str:
    ext = file_ext(path)
    return path.name[: -len(ext)] if ext else path.stem


def accepted() -> str:
    return ", ".join(ACCEPTED_EXTENSIONS)


def _read_text(path: Path, gz: bool = False) -> str:
    try:
        if gz:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except (OSError, EOFError) as exc:
        raise PromptError(f"cannot read prompts file {path}: {reason(exc)}") from exc


def read_prompt_file(path: Path) -> list[Prompt]:
    ext = file_ext(path)
    set_name = file_stem(path)
    if ext in (".jsonl", ".jsonl.gz"):
        return _load_jsonl(path, set_name, gz=ext == ".jsonl.gz")
    if ext == ".json":
        return _load_json(path, set_name)
    if ext == ".csv":
        return _load_csv(path, set_name)
    if ext == ".parquet":
        return _load_parquet(path, set_name)
    if ext == ".txt":
        text = _read_text(path)
        lines = [ln.strip() for ln in text.splitlines()]
        return [
            Prompt(id=f"{set_name}-{i:04d}", text=ln, messages=None)
            for i, ln in enumerate(ln for ln in lines if ln)
        ]
    raise PromptError(
        f"unsupported prompts file type: {path} (accepted: {accepted()})"
    )


def _load_jsonl(path: Path, set_name: str, gz: bool) -> list[Prompt]:
    prompts: list[Prompt] = []
    for lineno, line in enumerate(_read_text(path, gz=gz).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(
                f"{where}: malformed JSON ({json_error_text(exc, with_line=False)}); "
                "each line must be one JSON object"
            ) from exc
        prompts.append(record(rec, where, set_name, len(prompts)))
    return prompts


def _load_json(path: Path, set_name: str) -> list[Prompt]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise PromptError(
            f"{path}: line {exc.lineno}: malformed JSON ({json_error_text(exc, with_line=False)})"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptError(
            f"{path}: expected a JSON list of prompt objects or an object with a list under \"prompts\""
        )
    return [record(rec, f"{path}: record {i + 1}", set_name, i) for i, rec in enumerate(data)]


def _load_csv(path: Path, set_name: str) -> list[Prompt]:
    text = _read_text(path)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = fields
        if "prompt" not in fields and "messages" not in fields:
            raise PromptError(
                f"{path}: no 'prompt' column (columns: {', '.join(fields) or 'none'}); "
                "add a header row with a 'prompt' column"
            )
        prompts: list[Prompt] = []
        for row in reader:
            rec: dict[str, Any] = {}
            for key in ("id", "prompt", "messages"):
                val = row.get(key)
                if val not in (None, ""):
                    rec[key] = val
            if isinstance(rec.get("messages"), str):
                rec["messages"] = _json_field(rec["messages"], f"{path}: line {reader.line_num}")
            if not rec.get("prompt") and "messages" not in rec and "prompt" in fields:
                rec.setdefault("prompt", row.get("prompt") or "")
            prompts.append(record(rec, f"{path}: line {reader.line_num}", set_name, len(prompts)))
    except csv.Error as exc:
        raise PromptError(f"{path}: malformed CSV ({exc})") from exc
    return prompts


def _load_parquet(path: Path, set_name: str) -> list[Prompt]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for bad files
        raise PromptError(f"cannot read parquet prompts file {path}: {reason(exc)}") from exc
    cols = table.column_names
    if "prompt" not in cols and "messages" not in cols:
        raise PromptError(
            f"{path}: no 'prompt' column (columns: {', '.join(cols) or 'none'}); "
            "add a 'prompt' string column"
        )
    keep = [c for c in ("id", "prompt", "messages") if c in cols]
    prompts: list[Prompt] = []
    for i, row in enumerate(table.select(keep).to_pylist()):
        where = f"{path}: row {i + 1}"
        rec = {k: v for k, v in row.items() if v is not None}
        if isinstance(rec.get("messages"), str):
            rec["messages"] = _json_field(rec["messages"], where)
        prompts.append(record(rec, where, set_name, i))
    return prompts


def _json_field(value: str, where: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{where}: field 'messages' is not valid JSON ({json_error_text(exc, with_line=False)})") from exc


def record(rec: Any, where: str, set_name: str, index: int) -> Prompt:
    """Validate one record and turn it into a Prompt; ``where`` names file and line."""
    if not isinstance(rec, dict):
        raise PromptError(f"{where}: expected a JSON object with 'prompt' or 'messages', got {type(rec).__name__}")

    raw_id = rec.get("id")
    if raw_id is None:
        pid = f"{set_name}-{index:04d}"
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise PromptError(f"{where}: field 'id' must be a string or an integer, got {type(raw_id).__name__}")
    else:
        pid = str(raw_id).strip()
        if not pid:
            raise PromptError(f"{where}: field 'id' is empty (give a non-empty id or leave it out)")

    messages = rec.get("messages")
    if messages is not None:
        return Prompt(id=pid, text=None, messages=_check_messages(messages, where))

    if "prompt" not in rec:
        raise PromptError(f"{where}: record has no 'prompt' or 'messages' field (add one)")
    text = rec["prompt"]
    if not isinstance(text, str):
        raise PromptError(f"{where}: field 'prompt' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise PromptError(f"{where}: field 'prompt' is empty (give it some text)")
    return Prompt(id=pid, text=text, messages=None)


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PromptError(
            f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects"
        )
    out: list[dict] = []
    for j, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise PromptError(
                f"{where}: messages[{j}] must be an object with string 'role' and 'content'"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out
